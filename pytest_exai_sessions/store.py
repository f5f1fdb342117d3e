"""SessionStore: every statement that reads or writes ``public.sessions``.

Each write is one autocommit statement, so a returned ``await`` means committed, and
counters are incremented in SQL so that concurrent writers never lose an update.
Every method returns the row as PostgreSQL stored it: what a manager keeps in
memory is, by construction, what a reload after a crash returns.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
import select
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Self, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow, tuple_row
from psycopg.types.json import Jsonb, set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout

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


# A statement as psycopg takes it. The hot ones are composed once and kept as bytes:
# composing psycopg.sql objects on every call cost more than the round trip itself.
Query = bytes | sql.Composed


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


def _json_from_utf8(data: str | bytes) -> Any:
    # json.loads() given bytes first works out their encoding, which took as long as parsing
    # a small object. jsonb's text never starts with a BOM or a NUL, so it always settles on
    # UTF-8: decode it as json.loads() would.
    return json.loads(data if isinstance(data, str) else data.decode("utf-8", "surrogatepass"))


_Cursor = TypeVar("_Cursor", bound=psycopg.AsyncCursor[TupleRow])


def _session_cursor(cursor: _Cursor) -> _Cursor:
    """``cursor``, set up to read rows of sessions."""
    set_json_loads(_json_from_utf8, cursor)
    return cursor


class _PooledConnection(psycopg.AsyncConnection[Any]):
    """A connection of the store's pool, with one cursor kept for its single-row statements.

    A new cursor looks up the adapters of every parameter and result column again on its
    first statement, which cost more than the rest of a call's client-side work. A pooled
    connection runs one statement at a time, so its cursor can serve each of them.
    """

    _row_cursor: psycopg.AsyncCursor[TupleRow] | None = None

    def row_cursor(self) -> psycopg.AsyncCursor[TupleRow]:
        if self._row_cursor is None:
            self._row_cursor = _session_cursor(self.cursor(row_factory=tuple_row))
        return self._row_cursor


class _ConnectFailures:
    """The last failed connection attempt of one pool.

    A pool that cannot connect only reports ``PoolTimeout: pool initialization incomplete``;
    the reason (no such database, authentication failed, no server) goes to a log. This
    keeps it, so that PersistenceError can say why.
    """

    def __init__(self) -> None:
        self.last: psycopg.Error | None = None

    def connection_class(self) -> type[_PooledConnection]:
        failures = self

        class RecordingConnection(_PooledConnection):
            @classmethod
            async def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
                try:
                    connection = await super().connect(conninfo, **kwargs)
                except psycopg.Error as error:
                    failures.last = error
                    raise
                failures.last = None
                return connection

        return RecordingConnection


@contextmanager
def _database_errors(action: str, failures: _ConnectFailures | None = None) -> Iterator[None]:
    """Turn every driver or pool failure into PersistenceError naming what was attempted."""
    try:
        yield
    except psycopg.Error as error:
        raise _persistence_error(action, error, failures) from error


def _persistence_error(action: str, error: psycopg.Error, failures: _ConnectFailures | None) -> PersistenceError:
    reason = f"{type(error).__name__}: {error}".rstrip()
    if isinstance(error, PoolTimeout) and failures is not None and failures.last is not None:
        reason += f"; last connection attempt: {type(failures.last).__name__}: {failures.last}".rstrip()
    return PersistenceError(f"{action} failed: {reason}")


async def _discard_if_closed_by_server(conn: psycopg.AsyncConnection[Any]) -> None:
    """Pool check before each use: refuse a connection the server has closed meanwhile.

    An idle connection has nothing to read; if its socket is readable, the server has sent
    its goodbye (a restart, a terminated backend) or closed it. A select() costs no round
    trip, and it lets the first call after a database restart succeed instead of failing
    on a dead connection.
    """
    if conn.closed or select.select([conn.fileno()], [], [], 0)[0]:
        # Closed here, the pool drops it and opens a replacement; open, it would hand it out again.
        await conn.close()
        raise psycopg.OperationalError("the server closed this connection while it was idle")


class SessionStore:
    """Async access to ``public.sessions`` through a connection pool."""

    def __init__(self, conninfo: str, *, application_name: str, pool_options: Mapping[str, Any]) -> None:
        """Use ``await SessionStore.open(...)``: it builds the store and opens its pool."""
        self.conninfo = conninfo
        self.application_name = application_name
        # What open() was given, so a crash helper can open an equal store again.
        self.pool_options = dict(pool_options)
        # The pool gives up waiting for a connection after `timeout`; this also bounds a
        # statement on a server that accepted the connection but stopped answering.
        self._answer_within = 2 * self.pool_options["timeout"]
        self._connect_failures = _ConnectFailures()
        self._pool = self._new_pool()
        # Set when a call could not reach the server; the next call first checks whether it is back.
        self._server_lost = False

    def _new_pool(self) -> AsyncConnectionPool[_PooledConnection]:
        options = self.pool_options
        return AsyncConnectionPool[_PooledConnection](
            self.conninfo,
            connection_class=self._connect_failures.connection_class(),
            kwargs={
                "autocommit": True,
                "connect_timeout": options["connect_timeout"],
                "application_name": self.application_name,
            },
            min_size=options["min_size"],
            max_size=options["max_size"],
            timeout=options["timeout"],
            check=_discard_if_closed_by_server,
            open=False,
        )

    @classmethod
    async def open(
        cls,
        conninfo: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 5.0,
        connect_timeout: int = 5,
        application_name: str | None = None,
    ) -> Self:
        """Open a pool on ``conninfo`` and wait until one connection works.

        ``timeout`` bounds how long a call waits for a connection, so an unreachable
        database raises ``PersistenceError`` instead of hanging.
        """
        pool_options: dict[str, Any] = {
            "min_size": min_size,
            "max_size": max_size,
            "timeout": timeout,
            "connect_timeout": connect_timeout,
        }
        # A name of its own lets a crash helper find exactly this store's backends.
        name = application_name or f"exai-sessions-{secrets.token_hex(4)}"
        store = cls(conninfo, application_name=name, pool_options=pool_options)
        with _database_errors(f"connecting to {_describe(conninfo)}", store._connect_failures):
            await store._pool.open(wait=True, timeout=timeout)
        return store

    async def close(self) -> None:
        await self._pool.close()

    async def abandon(self) -> None:
        """Drop the pool without waiting for anything, as a dying process would."""
        await self._pool.close(timeout=0)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _fetch_one(self, action: str, query: Query, params: Mapping[str, Any]) -> Session | None:
        """Run one statement returning at most one session: every single-session call comes here.

        What ``_connection`` guarantees (reconnection, a deadline, PersistenceError), spelled
        out without its layers of context managers, which cost a sizeable part of a call.
        """
        if self._server_lost:
            await self._reconnect(action)
        try:
            async with asyncio.timeout(self._answer_within):
                conn = await self._pool.getconn()
                try:
                    cursor = conn.row_cursor()
                    await cursor.execute(query, params)
                    row = await cursor.fetchone()
                finally:
                    await self._pool.putconn(conn)
        except TimeoutError as error:
            raise self._no_answer(action) from error
        except psycopg.Error as error:
            self._note_failure(error)
            raise _persistence_error(action, error, self._connect_failures) from error
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
        async with self._connection(action) as conn, conn.transaction() as transaction:
            cur = _session_cursor(conn.cursor(row_factory=tuple_row))
            await cur.execute(query, params)
            rows = await cur.fetchall()
            if len(rows) != len(ids):
                raise psycopg.Rollback(transaction)  # leaves the block quietly, nothing counted
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
        async with self._connection(f"deleting session {session_id!r}") as conn:
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
        async with self._connection(f"expiring {len(session_ids)} sessions") as conn:
            cur = await conn.execute(query, params)
            return [row[0] for row in await cur.fetchall()]

    async def iter_live(
        self, *, stale_before: datetime, now: datetime, batch_size: int = 2000
    ) -> AsyncIterator[Session]:
        """Yield every live session, streamed through a server-side cursor (no page limit)."""
        query = sql.SQL("SELECT {returning} FROM {table} AS sessions WHERE {live}").format(
            returning=_RETURNING, table=_TABLE, live=_LIVE_SESSIONS
        )
        params = {"stale_before": stale_before, "now": now}
        async for session in self._stream("recovering sessions", query, params, batch_size):
            yield session

    async def iter_all(self, *, batch_size: int = 2000) -> AsyncIterator[Session]:
        """Every row, live or not (for checks after a crash), streamed like ``iter_live``."""
        query = sql.SQL("SELECT {returning} FROM {table} AS sessions").format(returning=_RETURNING, table=_TABLE)
        async for session in self._stream("reading all sessions", query, {}, batch_size):
            yield session

    async def _stream(
        self, action: str, query: sql.Composed, params: Mapping[str, Any], batch_size: int
    ) -> AsyncIterator[Session]:
        # The deadline applies to each round trip, not to the whole stream: recovering 100k
        # sessions may take longer than one call may wait, and the consumer's time is its own.
        async with (
            self._connection(action, bounded=False) as conn,
            conn.transaction(),
            _session_cursor(conn.cursor(name="exai_stream_sessions", row_factory=tuple_row)) as cur,
        ):
            async with self._deadline(action):
                await cur.execute(query, params)
            while True:
                async with self._deadline(action):
                    rows = await cur.fetchmany(batch_size)
                if not rows:
                    return
                for row in rows:
                    yield _to_session(row)

    @asynccontextmanager
    async def _connection(self, action: str, *, bounded: bool = True) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection; any failure becomes PersistenceError, and no call waits for ever."""
        if self._server_lost:
            await self._reconnect(action)
        try:
            with _database_errors(action, self._connect_failures):
                if bounded:
                    async with self._deadline(action), self._pool.connection() as conn:
                        yield conn
                else:
                    async with self._pool.connection() as conn:
                        yield conn
        except PersistenceError as error:
            if isinstance(error.__cause__, psycopg.Error):
                self._note_failure(error.__cause__)
            raise

    def _note_failure(self, error: psycopg.Error) -> None:
        """After a connection failure, the next call first checks whether the server is back."""
        if isinstance(error, psycopg.OperationalError):
            self._server_lost = True

    async def _reconnect(self, action: str) -> None:
        """After an outage: fail at once while the server is down, start afresh once it is back.

        The pool retries with a backoff that doubles up to minutes, so after a long outage it
        could keep failing calls long after the server returned. One direct connection tells
        whether the server is back; if it is, a new pool replaces the old one.
        """
        with _database_errors(action):
            probe = await psycopg.AsyncConnection.connect(
                self.conninfo, connect_timeout=self.pool_options["connect_timeout"]
            )
        await probe.close()
        old, self._pool = self._pool, self._new_pool()
        self._server_lost = False
        await old.close(timeout=0)
        with _database_errors(action, self._connect_failures):
            await self._pool.open(wait=False)

    @asynccontextmanager
    async def _deadline(self, action: str) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._answer_within):
                yield
        except TimeoutError as error:
            raise self._no_answer(action) from error

    def _no_answer(self, action: str) -> PersistenceError:
        return PersistenceError(f"{action} failed: the database did not answer within {self._answer_within:g}s")


def _describe(conninfo: str) -> str:
    """The DSN without its password, for error messages."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "the database (unparsable DSN)"
    params.pop("password", None)
    return (
        psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items() if v is not None})
        or "the default database"
    )
