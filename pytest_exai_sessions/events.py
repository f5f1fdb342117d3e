"""EventStore: every statement that reads or writes ``unified.event_metric_events`` and its views.

An EventStore works on a ``Database`` (the pool, deadlines and error mapping of db.py):
``EventStore(session_store.database)`` shares a SessionStore's, ``await EventStore.open(dsn)``
opens one of its own. Each write is one autocommit statement, so a returned ``await`` means
committed; every failure raises ``PersistenceError``.

The SessionManager's lifecycle events (created, expired, removed) are not separate
statements: ``SessionEvents`` builds the ``INSERT`` that ``SessionStore`` runs in the same
statement as the session change, so the session row and its event commit together or
not at all, in one round trip.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Self, TypeVar, Unpack
from uuid import UUID

from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ValidationError

from .db import Database, PoolOptions
from .errors import PersistenceError
from .models import (
    ErrorSummary,
    Event,
    EventSeverity,
    PerformanceMetrics,
    RecentEvent,
    RecordedEvent,
    check_json_object,
    check_text,
)

TABLE_NAME = ("unified", "event_metric_events")
TABLE = sql.Identifier(*TABLE_NAME)
RECENT_EVENTS_VIEW = ("unified", "mv_recent_events_24h")
ERROR_SUMMARY_VIEW = ("unified", "mv_error_summary_7d")
PERFORMANCE_VIEW = ("unified", "mv_performance_metrics_1h")

# The SessionManager's events: where they come from and how they are filed.
LIFECYCLE_SOURCE = "exai_sessions"
LIFECYCLE_CATEGORY = "session_lifecycle"
# A generous ceiling for one query: more rows than this belong in a paginated report.
MAX_QUERY_LIMIT = 100_000

_JSON_COLUMNS = frozenset({"event_data", "event_metrics", "event_metadata"})
_ENUM_COLUMNS = frozenset({"severity", "status"})
_RECORDED_COLUMNS = list(RecordedEvent.model_fields)

M = TypeVar("M", bound=BaseModel)


class SessionLifecycle(StrEnum):
    """``event_type`` of the events a SessionManager with ``record_events=True`` writes."""

    CREATED = "session.created"
    RECOVERED = "session.recovered"
    EXPIRED = "session.expired"
    REMOVED = "session.removed"


def _columns(names: list[str]) -> sql.Composable:
    return sql.SQL(", ").join(map(sql.Identifier, names))


def _param(column: str, value: Any) -> Any:
    if column in _JSON_COLUMNS:
        return Jsonb(value)
    if column in _ENUM_COLUMNS and value is not None:
        return str(value)
    return value


def _to_model(model: type[M], row: Mapping[str, Any], relation: tuple[str, str]) -> M:
    try:
        return model.model_validate(row)
    except ValidationError as error:
        raise PersistenceError(f"a row of {'.'.join(relation)} does not fit {model.__name__}: {error}") from error


@dataclass(frozen=True)
class SessionEvents:
    """One lifecycle event for each session row a statement returns, inserted by that statement.

    ``insert_from(rows)`` gives the ``INSERT ... SELECT ... FROM rows`` that SessionStore puts
    into a ``WITH`` clause next to its own change; ``rows`` must have the columns
    ``session_id`` and ``user_id``. Parameter names start with ``exai_event_`` so that they
    never collide with the statement's own.
    """

    event_type: SessionLifecycle
    event_data: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_json_object(dict(self.event_data))

    def insert_from(self, rows: sql.Identifier) -> tuple[sql.Composed, dict[str, Any]]:
        query = sql.SQL(
            "INSERT INTO {table} (event_type, event_category, source_system, session_id, user_id, event_data)"
            " SELECT %(exai_event_type)s, %(exai_event_category)s, %(exai_event_source)s,"
            " r.session_id, r.user_id, %(exai_event_data)s FROM {rows} AS r"
        ).format(table=TABLE, rows=rows)
        params = {
            "exai_event_type": str(self.event_type),
            "exai_event_category": LIFECYCLE_CATEGORY,
            "exai_event_source": LIFECYCLE_SOURCE,
            "exai_event_data": Jsonb(dict(self.event_data)),
        }
        return query, params


def _optional_text(name: str, value: str | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    try:
        return check_text(value)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _optional_instant(name: str, value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got {value.isoformat()}")
    return value


class EventStore:
    """Async access to ``unified.event_metric_events`` and the summaries its materialized views hold."""

    def __init__(self, database: Database, *, close_database: bool = False) -> None:
        """Work on ``database`` (shared, by default); ``close_database=True`` makes ``close()`` close it."""
        self.database = database
        self._owns_database = close_database

    @classmethod
    async def open(cls, conninfo: str, **pool_options: Unpack[PoolOptions]) -> Self:
        """An EventStore with a pool of its own: ``Database.open(conninfo, **pool_options)``."""
        return cls(await Database.open(conninfo, **pool_options), close_database=True)

    async def close(self) -> None:
        if self._owns_database:
            await self.database.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _fetch_all(
        self, action: str, query: sql.Composed, params: Mapping[str, Any], *, writes: bool = True
    ) -> list[dict[str, Any]]:
        return await self.database.fetch_all(action, query, params, row_factory=dict_row, writes=writes)

    async def record(self, event: Event) -> RecordedEvent:
        """Insert ``event``; return the row as stored (id, timestamps, standardised metadata)."""
        if not isinstance(event, Event):
            raise TypeError(f"record() takes an Event, not {type(event).__name__}")
        # Only the fields of Event: recording a RecordedEvent again records a copy with a new id.
        values = {name: getattr(event, name) for name in Event.model_fields}
        if values["event_timestamp"] is None:
            del values["event_timestamp"]  # the column default: unified.clock_now()
        names = list(values)
        query = sql.SQL("INSERT INTO {table} ({columns}) VALUES ({values}) RETURNING {returning}").format(
            table=TABLE,
            columns=_columns(names),
            values=sql.SQL(", ").join(sql.Placeholder(name) for name in names),
            returning=_columns(_RECORDED_COLUMNS),
        )
        params = {name: _param(name, value) for name, value in values.items()}
        rows = await self._fetch_all(f"recording event {event.event_type!r}", query, params)
        return _to_model(RecordedEvent, rows[0], TABLE_NAME)

    async def query(
        self,
        *,
        event_type: str | None = None,
        event_category: str | None = None,
        source_system: str | None = None,
        session_id: str | None = None,
        user_id: str | None = None,
        correlation_id: str | None = None,
        severity: EventSeverity | str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = 1000,
        newest_first: bool = True,
    ) -> list[RecordedEvent]:
        """Events matching every filter given; ``since`` inclusive, ``until`` exclusive.

        A time range lets PostgreSQL skip the partitions outside it.
        """
        equal = {
            "event_type": _optional_text("event_type", event_type),
            "event_category": _optional_text("event_category", event_category),
            "source_system": _optional_text("source_system", source_system),
            "session_id": _optional_text("session_id", session_id),
            "user_id": _optional_text("user_id", user_id),
            "correlation_id": _optional_text("correlation_id", correlation_id),
            "severity": None if severity is None else str(EventSeverity(severity)),
        }
        start = _optional_instant("since", since)
        end = _optional_instant("until", until)
        if start is not None and end is not None and start > end:
            raise ValueError(f"since ({start.isoformat()}) is after until ({end.isoformat()})")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        if limit is not None and limit > MAX_QUERY_LIMIT:
            raise ValueError(f"limit {limit} is above {MAX_QUERY_LIMIT}; narrow the time range instead")

        conditions: list[sql.Composable] = []
        params: dict[str, Any] = {}
        for column, value in equal.items():
            if value is not None:
                conditions.append(sql.SQL("{} = {}").format(sql.Identifier(column), sql.Placeholder(column)))
                params[column] = value
        if start is not None:
            conditions.append(sql.SQL("event_timestamp >= %(since)s"))
            params["since"] = start
        if end is not None:
            conditions.append(sql.SQL("event_timestamp < %(until)s"))
            params["until"] = end
        where = sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true")
        order = sql.SQL("DESC") if newest_first else sql.SQL("ASC")
        query = sql.SQL("SELECT {columns} FROM {table} WHERE {where} ORDER BY event_timestamp {order}, id").format(
            columns=_columns(_RECORDED_COLUMNS), table=TABLE, where=where, order=order
        )
        if limit is not None:
            query = sql.Composed([query, sql.SQL(" LIMIT %(limit)s")])
            params["limit"] = limit
        rows = await self._fetch_all("querying events", query, params, writes=False)
        return [_to_model(RecordedEvent, row, TABLE_NAME) for row in rows]

    async def get(self, event_id: UUID | str) -> RecordedEvent | None:
        """The event with this id, or None."""
        try:
            key = event_id if isinstance(event_id, UUID) else UUID(str(event_id))
        except ValueError:
            raise ValueError(f"event id must be a UUID, got {event_id!r}") from None
        query = sql.SQL("SELECT {columns} FROM {table} WHERE id = %(id)s").format(
            columns=_columns(_RECORDED_COLUMNS), table=TABLE
        )
        rows = await self._fetch_all(f"loading event {key}", query, {"id": key}, writes=False)
        return _to_model(RecordedEvent, rows[0], TABLE_NAME) if rows else None

    # the summaries of the materialized views

    async def refresh_summaries(self) -> None:
        """Refresh the three views (CONCURRENTLY: readers are not blocked), as of ``unified.clock_now()``."""
        query = sql.SQL("SELECT {}()").format(sql.Identifier("unified", "refresh_materialized_views"))
        await self._fetch_all("refreshing the materialized views", query, {})

    async def _view(self, model: type[M], view: tuple[str, str], order: str) -> list[M]:
        query = sql.SQL("SELECT {columns} FROM {view} ORDER BY {order}").format(
            columns=_columns(list(model.model_fields)), view=sql.Identifier(*view), order=sql.SQL(order)
        )
        rows = await self._fetch_all(f"reading {'.'.join(view)}", query, {}, writes=False)
        return [_to_model(model, row, view) for row in rows]

    async def recent_events(self) -> list[RecentEvent]:
        """Events of the 24 hours before the last refresh, newest first."""
        return await self._view(RecentEvent, RECENT_EVENTS_VIEW, "event_timestamp DESC, id")

    async def error_summary(self) -> list[ErrorSummary]:
        """Errors and critical events per UTC day, type, source and severity over the 7 days before the last refresh."""
        return await self._view(ErrorSummary, ERROR_SUMMARY_VIEW, "event_day, event_type, source_system, severity")

    async def performance_metrics(self) -> list[PerformanceMetrics]:
        """Duration and response-time statistics per type and source over the hour before the last refresh."""
        return await self._view(PerformanceMetrics, PERFORMANCE_VIEW, "event_type, source_system")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} on {self.database!r}>"
