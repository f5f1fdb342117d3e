"""SessionStore: every statement that reads or writes ``public.sessions``.

Each write is one statement (autocommit; ``merge_data`` and ``record_requests`` run theirs
in a transaction that can still refuse the result), so a returned ``await`` means
committed, and counters and merges are computed in SQL so that concurrent writers never
lose an update. A write that raised ``PersistenceError`` did not take effect, unless the
error is ``CommitUncertain`` (see db.py): then a request counted with a ``request_id`` can
be sent again, and is counted once.
Every method returns the row as PostgreSQL stored it: what a manager hands out is, by
construction, what any other replica or a reload after a crash reads.
It implements ``store_interface.ManagedStorage``, as ``MemoryStore`` does; the statements
only the original service API runs are in session_service.py, built from this module's
``TABLE``, ``RETURNING``, ``insert_lists``, ``column_params`` and ``to_session``.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Self, Unpack

import psycopg
from psycopg import Rollback, sql
from psycopg.rows import tuple_row
from psycopg.types.json import Jsonb

from .db import Database, PoolOptions, Query, database_errors, tuple_cursor
from .errors import PersistenceError, SchemaMissing, SessionConflict
from .events import EventStore, SessionEvents
from .models import Session, SessionMetrics, check_json_object
from .store_interface import ManagedStorage

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
    "version": "version",
}
# Column types, for the INSERT ... SELECT of create(), whose values get no type from the target.
_TYPES: Mapping[str, str] = {
    "session_id": "text",
    "state": "text",
    "user_id": "text",
    "user_type": "text",
    "ip_address": "inet",
    "user_agent": "text",
    "data": "jsonb",
    "metadata": "jsonb",
    "request_count": "bigint",
    "total_duration_ms": "bigint",
    "created_at": "timestamptz",
    "last_activity": "timestamptz",
    "expires_at": "timestamptz",
    "version": "bigint",
}
# Sessions come back as tuples in this order, the order of RETURNING's columns.
_FIELDS = tuple(COLUMNS)
_JSON_FIELDS = frozenset({"data", "metadata"})
TABLE = sql.Identifier("public", "sessions")


def _select_list() -> sql.Composable:
    # host() gives the bare address back; inet's text form would add a /32 mask.
    items = [
        sql.SQL("host({c}) AS {f}").format(c=sql.Identifier(column), f=sql.Identifier(field))
        if field == "ip_address"
        else sql.SQL("{c} AS {f}").format(c=sql.Identifier(column), f=sql.Identifier(field))
        for field, column in COLUMNS.items()
    ]
    return sql.SQL(", ").join(items)


# Every column as the Session field it fills, in COLUMNS' order: what to_session() reads.
RETURNING = _select_list()
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


def insert_lists() -> tuple[sql.Composed, sql.Composed]:
    """Every column, and the typed parameter of each: what an INSERT of a whole session names."""
    columns = sql.SQL(", ").join(sql.Identifier(column) for column in COLUMNS.values())
    values = sql.SQL(", ").join(
        sql.SQL("CAST({p} AS {t})").format(p=sql.Placeholder(field), t=sql.SQL(_TYPES[field])) for field in COLUMNS
    )
    return columns, values


def _create_query_composed(*, limited: bool) -> sql.Composed:
    columns, values = insert_lists()
    # created_at restarts too: a restarted id is a new session. Its version goes on from the
    # old row's, so a compare-and-set that read the old session cannot hit the new one.
    # recent_request_ids is left as it was: only a request with an id needs sql/011.
    updates = sql.SQL(", ").join(
        sql.SQL("{c} = sessions.{c} + 1").format(c=sql.Identifier(column))
        if field == "version"
        else sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(column))
        for field, column in COLUMNS.items()
        if field != "session_id"
    )
    # With a limit, the slot is reserved (the count taken under a lock all creators take) in
    # the same statement, so a replica's count and its insert are one step for every other one.
    reserve = (
        sql.SQL(" WHERE unified.reserve_session_slot(%(limit)s, %(stale_before)s, %(now)s)") if limited else sql.SQL("")
    )
    return sql.SQL(
        "INSERT INTO {table} AS sessions ({columns}) SELECT {values}{reserve}"
        " ON CONFLICT (session_id) DO UPDATE SET {updates} WHERE NOT ({live}) RETURNING {returning}"
    ).format(
        table=TABLE,
        columns=columns,
        values=values,
        reserve=reserve,
        updates=updates,
        live=_LIVE_SESSIONS,
        returning=RETURNING,
    )


@functools.cache
def _create_query(*, limited: bool) -> bytes:
    return _compiled(_create_query_composed(limited=limited))


@functools.cache
def _fetch_live_query(*, confirmed: bool = False) -> bytes:
    # Confirmed: under synchronous replication the statement logs a transactional message (a
    # WAL record, empty, that logical decoding shows under the prefix "exai-sessions"), so that
    # its commit waits for the synchronous standbys as a write's does; without WAL written, a
    # transaction id alone would not wait. Every commit before it is then on them too: what it
    # read cannot vanish in a failover, even a row whose own write was uncertain. CASE, not OR:
    # its branches are taken in order, so a server without standbys writes nothing.
    confirm = (
        sql.SQL(
            " AND CASE WHEN current_setting('synchronous_standby_names') = '' THEN true"
            " ELSE pg_logical_emit_message(true, 'exai-sessions', '') IS NOT NULL END"
        )
        if confirmed
        else sql.SQL("")
    )
    return _compiled(
        sql.SQL("SELECT {returning} FROM {table} AS sessions WHERE session_id = %(id)s AND {live}{confirm}").format(
            returning=RETURNING, table=TABLE, live=_LIVE_FOUND, confirm=confirm
        )
    )


@functools.cache
def _fetch_query() -> bytes:
    return _compiled(
        sql.SQL("SELECT {returning} FROM {table} AS sessions WHERE session_id = %(id)s").format(
            returning=RETURNING, table=TABLE
        )
    )


@functools.cache
def _record_request_query(*, live_only: bool = True) -> bytes:
    guard = sql.SQL(" AND {live}").format(live=_LIVE_FOUND) if live_only else sql.SQL("")
    return _compiled(
        sql.SQL(
            "UPDATE {table} AS sessions SET request_count = request_count + 1,"
            " total_duration_ms = total_duration_ms + %(duration_ms)s, last_activity_at = %(now)s,"
            " version = version + 1"
            " WHERE session_id = %(id)s{guard} RETURNING {returning}"
        ).format(table=TABLE, guard=guard, returning=RETURNING)
    )


# A request with an id counts only when the id is not among the session's recent ones
# (sql/011_request_ids.sql); one statement, so two replicas sending one id at once count it
# once: the second waits for the first's row lock, and recomputes this from the row it wrote.
_COUNT_NEW = sql.SQL(
    "(request_count, total_duration_ms, recent_request_ids) ="
    " (SELECT sessions.request_count + {requests} + new.requests,"
    " sessions.total_duration_ms + {duration} + new.duration_ms, new.recent"
    " FROM unified.count_new_requests(sessions.recent_request_ids, {identified}) AS new)"
)


@functools.cache
def _record_identified_request_query() -> bytes:
    counted = _COUNT_NEW.format(requests=sql.SQL("0"), duration=sql.SQL("0"), identified=sql.Placeholder("identified"))
    return _compiled(
        sql.SQL(
            "UPDATE {table} AS sessions SET {counted}, last_activity_at = %(now)s, version = version + 1"
            " WHERE session_id = %(id)s AND {live} RETURNING {returning}"
        ).format(table=TABLE, counted=counted, live=_LIVE_FOUND, returning=RETURNING)
    )


def count_request_query() -> bytes:
    """``record_request``'s UPDATE without the liveness check: the original service counts on a row in any state."""
    return _record_request_query(live_only=False)


@functools.cache
def _record_requests_query() -> bytes:
    # "= ANY" as well as the join: the planner then reads the batch's rows through the
    # session_id index, also on a table without statistics, instead of every live session.
    return _compiled(
        sql.SQL(
            "UPDATE {table} AS sessions SET request_count = request_count + batch.requests,"
            " total_duration_ms = total_duration_ms + batch.duration_ms, last_activity_at = %(now)s,"
            " version = version + 1"
            " FROM unnest(%(ids)s::text[], %(counts)s::bigint[], %(durations)s::bigint[])"
            " AS batch(batch_session_id, requests, duration_ms)"
            " WHERE sessions.session_id = ANY(%(ids)s::text[]) AND sessions.session_id = batch.batch_session_id"
            " AND {live} RETURNING {returning}"
        ).format(table=TABLE, live=_LIVE_FOUND, returning=RETURNING)
    )


@functools.cache
def _record_identified_requests_query() -> bytes:
    counted = _COUNT_NEW.format(
        requests=sql.SQL("batch.requests"),
        duration=sql.SQL("batch.duration_ms"),
        identified=sql.SQL("batch.identified"),
    )
    return _compiled(
        sql.SQL(
            "UPDATE {table} AS sessions SET {counted}, last_activity_at = %(now)s, version = version + 1"
            " FROM unnest(%(ids)s::text[], %(counts)s::bigint[], %(durations)s::bigint[], %(identified)s::jsonb[])"
            " AS batch(batch_session_id, requests, duration_ms, identified)"
            " WHERE sessions.session_id = ANY(%(ids)s::text[]) AND sessions.session_id = batch.batch_session_id"
            " AND {live} RETURNING {returning}"
        ).format(table=TABLE, counted=counted, live=_LIVE_FOUND, returning=RETURNING)
    )


def _update_query(fields: Iterable[str], *, compare_version: bool) -> sql.Composed:
    """Set each of ``fields`` from the parameter ``set_<field>``, and ``last_activity`` from ``now``.

    ``compare_version``: only where the row is at ``expected_version`` (compare-and-set).
    """
    assignments: list[sql.Composable] = [
        sql.SQL("{c} = {p}").format(c=sql.Identifier(COLUMNS[f]), p=sql.Placeholder(f"set_{f}")) for f in fields
    ]
    assignments.append(sql.SQL("last_activity_at = %(now)s, version = version + 1"))
    guard = sql.SQL(" AND version = %(expected_version)s") if compare_version else sql.SQL("")
    return sql.SQL(
        "UPDATE {table} AS sessions SET {assignments} WHERE session_id = %(id)s AND {live}{guard} RETURNING {returning}"
    ).format(
        table=TABLE, assignments=sql.SQL(", ").join(assignments), live=_LIVE_FOUND, guard=guard, returning=RETURNING
    )


@functools.cache
def _merge_query() -> bytes:
    # jsonb || merges top-level keys in the database: concurrent merges never overwrite
    # each other's keys, as a read-modify-write of the whole object in Python would.
    return _compiled(
        sql.SQL(
            "UPDATE {table} AS sessions SET session_data = session_data || %(patch)s, last_activity_at = %(now)s,"
            " version = version + 1 WHERE session_id = %(id)s AND {live} RETURNING {returning}"
        ).format(table=TABLE, live=_LIVE_FOUND, returning=RETURNING)
    )


@functools.cache
def _live_ids_query() -> bytes:
    return _compiled(
        sql.SQL("SELECT session_id FROM {table} AS sessions WHERE {live} ORDER BY session_id").format(
            table=TABLE, live=_LIVE_SESSIONS
        )
    )


@functools.cache
def _metrics_query() -> bytes:
    # Over the rows still marked active (idle ones included until cleanup expires them), as the
    # manager's metrics have always counted; "live" is the liveness rule at ``now``.
    age = sql.SQL("extract(epoch FROM %(now)s - created_at)::float8")
    return _compiled(
        sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE {live}), max({age}), min({age}), avg({age})"
            " FROM {table} AS sessions WHERE session_state = 'active'"
        ).format(table=TABLE, live=_LIVE_SESSIONS, age=age)
    )


def _expire_stale_query() -> sql.Composed:
    # In batches, so that one sweep over a backlog of millions holds no lock for long; the
    # index on (session_state, last_activity_at) and the one on expires_at find the rows.
    # The UPDATE checks liveness again on the row it locked: a session another replica
    # used meanwhile is not expired, and of two replicas sweeping at once one expires each row.
    return sql.SQL(
        "WITH stale AS (SELECT id FROM {table} AS sessions WHERE session_state = 'active'"
        " AND (last_activity_at < %(stale_before)s OR expires_at <= %(now)s) LIMIT %(batch)s)"
        " UPDATE {table} AS sessions SET session_state = 'expired', version = version + 1"
        " FROM stale WHERE sessions.id = stale.id AND session_state = 'active' AND NOT ({live})"
        " RETURNING session_id, user_id"
    ).format(table=TABLE, live=_LIVE_SESSIONS)


def _param(field: str, value: Any) -> Any:
    if field in _JSON_FIELDS:
        return Jsonb(value)
    if field in ("state", "user_type"):
        return str(value)
    return value


def column_params(session: Session) -> dict[str, Any]:
    """Every field of ``session`` as the parameter of its column: what ``insert_lists()`` names."""
    return {field: _param(field, getattr(session, field)) for field in COLUMNS}


def to_session(row: Sequence[Any]) -> Session:
    """The session in a row of ``RETURNING``'s columns."""
    try:
        return Session.from_database(dict(zip(_FIELDS, row, strict=True)))
    except (ValueError, KeyError, AttributeError) as error:
        session_id = row[0] if row else None
        raise PersistenceError(
            f"row of public.sessions with session_id {session_id!r} is not a valid session: {error}"
        ) from error


_to_session = to_session  # the name benchmarks/profile_calls.py imports


class SessionStore(ManagedStorage):
    """Async access to ``public.sessions`` through a ``Database`` (its pool, deadlines and errors)."""

    persistent = True  # what it writes survives the process (MemoryStore: False)
    kind = "persisted"

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
        database raises ``PersistenceError`` instead of hanging. ``prepared_statements``:
        None (default) prepares unless a pooler is in between, True always, False never.
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

    def event_store(self) -> EventStore:
        """An EventStore on this store's database: lifecycle events commit with the changes they record."""
        return EventStore(self.database)

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

    async def _fetch_one(
        self, action: str, query: Query, params: Mapping[str, Any], *, writes: bool = True
    ) -> Session | None:
        row = await self.database.fetch_one(action, query, params, writes=writes)
        return None if row is None else to_session(row)

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

        Returns the stored row, or None when a live session already holds the id or
        ``limit`` sessions are live (in the whole database: every replica's count).
        ``events``: also record a lifecycle event for the row, in the same statement.
        """
        limited = limit is not None
        query: Query = _create_query(limited=limited)
        params: dict[str, Any] = {}
        if events is not None:
            query, params = _logged(_create_query_composed(limited=limited), events, sql.SQL("*"))
        params.update(column_params(session))
        params.update(limit=limit, stale_before=stale_before, now=now)
        return await self._fetch_one(f"creating session {session.session_id!r}", query, params)

    async def check(self) -> None:
        """Raise PersistenceError unless ``public.sessions`` has every column the store reads (reads no row)."""
        query = sql.SQL("SELECT {returning} FROM {table} AS sessions LIMIT 0").format(returning=RETURNING, table=TABLE)
        try:
            await self.database.fetch_all("checking public.sessions", query, {}, writes=False)
        except PersistenceError as error:
            cause = error.__cause__
            if isinstance(cause, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn):
                raise SchemaMissing(cause.diag.message_primary or str(cause)) from error
            raise

    async def fetch(self, session_id: str) -> Session | None:
        """The row of ``session_id`` in any state, live or not (None: there is none)."""
        return await self._fetch_one(
            f"reading session {session_id!r}", _fetch_query(), {"id": session_id}, writes=False
        )

    async def fetch_live(
        self, session_id: str, *, stale_before: datetime, now: datetime, confirmed: bool = False
    ) -> Session | None:
        params = {"id": session_id, "stale_before": stale_before, "now": now}
        query = _fetch_live_query(confirmed=confirmed)
        # Confirmed, it commits: its wait for the standby can end unconfirmed, as a write's.
        return await self._fetch_one(f"loading session {session_id!r}", query, params, writes=confirmed)

    async def record_request(
        self,
        session_id: str,
        *,
        duration_ms: int,
        now: datetime,
        stale_before: datetime,
        request_id: str | None = None,
    ) -> Session | None:
        """Count one request atomically; None when no live session has the id.

        ``request_id``: count it only if no request of that id was among the session's last
        32; either way the session's ``last_activity`` and ``version`` move.
        """
        action = f"recording a request of session {session_id!r}"
        params: dict[str, Any] = {
            "id": session_id,
            "duration_ms": duration_ms,
            "now": now,
            "stale_before": stale_before,
        }
        if request_id is None:
            return await self._fetch_one(action, _record_request_query(), params)
        params["identified"] = Jsonb([[request_id, duration_ms]])
        return await self._fetch_one(action, _record_identified_request_query(), params)

    async def record_requests(
        self,
        requests: Mapping[str, tuple[int, int]],
        *,
        now: datetime,
        stale_before: datetime,
        identified: Mapping[str, Sequence[tuple[str, int]]] | None = None,
    ) -> list[Session]:
        """Count many requests in one statement: ``{session_id: (count, duration_ms)}``.

        ``identified``: ``{session_id: [(request_id, duration_ms), ...]}``, requests counted
        only when their id is new (as ``record_request``'s), besides those of ``requests``;
        each of their sessions must be in ``requests`` too, with ``(0, 0)`` if it has no other.
        All or nothing: when a session is not live, nothing is counted and the result lists
        only the live ones, so the caller can tell which are missing.
        """
        ids = list(requests)
        params: dict[str, Any] = {
            "ids": ids,
            "counts": [requests[i][0] for i in ids],
            "durations": [requests[i][1] for i in ids],
            "now": now,
            "stale_before": stale_before,
        }
        query = _record_requests_query()
        if identified:
            unknown = sorted(set(identified) - set(requests))
            if unknown:
                raise ValueError(f"identified requests of sessions not in requests: {unknown}")
            params["identified"] = [Jsonb([list(pair) for pair in identified.get(i, ())]) for i in ids]
            query = _record_identified_requests_query()
        action = f"recording requests of {len(ids)} sessions"
        async with self.database.connection(action) as conn, conn.transaction() as transaction:
            cur = tuple_cursor(conn.cursor(row_factory=tuple_row))
            await cur.execute(query, params)
            rows = await cur.fetchall()
            if len(rows) != len(ids):
                raise Rollback(transaction)  # leaves the block quietly, nothing counted
        return [to_session(row) for row in rows]

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

        ``expected_version``: write only if the row is at that version, else raise
        ``SessionConflict`` with the version it is at (and write nothing).
        """
        params: dict[str, Any] = {f"set_{f}": _param(f, value) for f, value in changes.items()}
        params.update(id=session_id, now=now, stale_before=stale_before, expected_version=expected_version)
        query = _update_query(changes, compare_version=expected_version is not None)
        stored = await self._fetch_one(f"updating session {session_id!r}", query, params)
        if stored is None and expected_version is not None:
            current = await self.fetch_live(session_id, stale_before=stale_before, now=now)
            if current is not None:
                raise SessionConflict(session_id, expected_version=expected_version, current_version=current.version)
        return stored

    async def merge_data(
        self, session_id: str, patch: Mapping[str, Any], *, now: datetime, stale_before: datetime
    ) -> Session | None:
        """Merge ``patch``'s top-level keys into ``data`` in one statement; None when not live.

        When the merged ``data`` would break the size limit, ValueError, and nothing is written.
        """
        params = {"id": session_id, "patch": Jsonb(patch), "now": now, "stale_before": stale_before}
        action = f"merging into the data of session {session_id!r}"
        async with self.database.connection(action) as conn, conn.transaction():
            cur = tuple_cursor(conn.cursor(row_factory=tuple_row))
            await cur.execute(_merge_query(), params)
            row = await cur.fetchone()
            if row is None:
                return None
            stored = to_session(row)
            # Raising rolls the merge back: the limit holds for the merged object, which
            # only the database sees whole.
            check_json_object(stored.data)
        return stored

    async def live_ids(self, *, stale_before: datetime, now: datetime) -> list[str]:
        """The ids of every live session, sorted."""
        params = {"stale_before": stale_before, "now": now}
        rows = await self.database.fetch_all("listing live sessions", _live_ids_query(), params, writes=False)
        return [row[0] for row in rows]

    async def metrics(self, *, stale_before: datetime, now: datetime) -> SessionMetrics:
        """Counts and ages (seconds at ``now``) of the sessions still marked active."""
        params = {"stale_before": stale_before, "now": now}
        row = await self.database.fetch_one("reading session metrics", _metrics_query(), params, writes=False)
        assert row is not None  # an aggregate always returns its row
        total, live, oldest, newest, average = row
        return SessionMetrics(total, live, oldest or 0.0, newest or 0.0, average or 0.0)

    async def delete(self, session_id: str, *, events: SessionEvents | None = None) -> bool:
        """Delete the row; False when there was none. ``events``: record it, in the same statement."""
        change = sql.SQL("DELETE FROM {table} WHERE session_id = %(id)s RETURNING session_id, user_id").format(
            table=TABLE
        )
        query, params = _logged(change, events, sql.SQL("session_id"))
        params["id"] = session_id
        return bool(await self.database.fetch_all(f"deleting session {session_id!r}", query, params))

    async def expire_stale(
        self, *, stale_before: datetime, now: datetime, events: SessionEvents | None = None, batch_size: int = 5000
    ) -> list[str]:
        """Mark every active session that is no longer live expired, in any replica's name; return their ids.

        ``events``: record one event per expired session, in the same statement as its change.
        """
        query, params = _logged(_expire_stale_query(), events, sql.SQL("session_id"))
        params.update(stale_before=stale_before, now=now, batch=batch_size)
        expired: list[str] = []
        while True:
            batch = [row[0] for row in await self.database.fetch_all("expiring timed-out sessions", query, params)]
            expired += batch
            if len(batch) < batch_size:
                return expired

    async def iter_live(
        self, *, stale_before: datetime, now: datetime, batch_size: int = 2000
    ) -> AsyncIterator[Session]:
        """Yield every live session, streamed through a server-side cursor (no page limit)."""
        query = sql.SQL("SELECT {returning} FROM {table} AS sessions WHERE {live}").format(
            returning=RETURNING, table=TABLE, live=_LIVE_SESSIONS
        )
        params = {"stale_before": stale_before, "now": now}
        async for row in self.database.stream("recovering sessions", query, params, batch_size=batch_size):
            yield to_session(row)

    # CrashTestable (and abandon, beside close): for the crash tools, never the application.

    async def delete_all(self) -> int:
        """Delete every row, live or not; return how many (for tests that start afresh, never in production)."""
        query = sql.SQL("DELETE FROM {table}").format(table=TABLE)
        async with self.database.connection("deleting every session") as conn:
            cur = await conn.execute(query)
            return cur.rowcount

    def read_live(self, *, stale_before: datetime, now: datetime) -> dict[str, Session]:
        """Every live session by id, read on a connection of its own without an event loop.

        For synchronous callers (``snapshot``): works while the pool is closed or abandoned.
        """
        query = sql.SQL("SELECT {returning} FROM {table} AS sessions WHERE {live}").format(
            returning=RETURNING, table=TABLE, live=_LIVE_SESSIONS
        )
        with database_errors("reading live sessions"), psycopg.connect(self.conninfo, autocommit=True) as conn:
            rows = conn.cursor(row_factory=tuple_row).execute(query, {"stale_before": stale_before, "now": now})
            sessions = [to_session(row) for row in rows]
        return {session.session_id: session for session in sessions}

    async def iter_all(self, *, batch_size: int = 2000) -> AsyncIterator[Session]:
        """Every row, live or not (for checks after a crash), streamed like ``iter_live``."""
        query = sql.SQL("SELECT {returning} FROM {table} AS sessions").format(returning=RETURNING, table=TABLE)
        async for row in self.database.stream("reading all sessions", query, {}, batch_size=batch_size):
            yield to_session(row)
