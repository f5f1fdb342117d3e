"""The persisted session record and the rules its fields obey."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from ipaddress import ip_address
from typing import Annotated, Any, NamedTuple
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

MAX_ID_LENGTH = 255
# Deep nesting makes json and jsonb recurse; beyond this a payload is almost surely a bug.
MAX_JSON_DEPTH = 64
# Rows far above this make every recovery slow; store large blobs elsewhere and keep a reference.
MAX_JSON_BYTES = 1_000_000
# A request that took longer than a week is a clock or unit error, not a measurement.
MAX_DURATION_MS = 7 * 24 * 3600 * 1000
# Unicode's control characters (category Cc) are exactly these: C0, DEL and C1. One regex
# search is much cheaper than looking up the category of every character of the id.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class SessionState(StrEnum):
    ACTIVE = "active"
    INACTIVE = "inactive"
    EXPIRED = "expired"


class UserType(StrEnum):
    HUMAN = "human"
    AGENT = "agent"
    SYSTEM = "system"


def check_session_id(value: object) -> str:
    """Return ``value`` if it is a valid session id, else raise ``ValueError`` saying why."""
    if not isinstance(value, str):
        raise ValueError(f"session id must be a str, not {type(value).__name__}")
    if not value.strip():
        raise ValueError("session id must not be empty or blank")
    if len(value) > MAX_ID_LENGTH:
        raise ValueError(f"session id is {len(value)} characters long; at most {MAX_ID_LENGTH} are allowed")
    control = _CONTROL_CHARACTER.search(value)
    if control is not None:
        raise ValueError(f"session id contains control character {control.group()!r} at position {control.start()}")
    return value


def check_json_object(value: dict[str, Any]) -> dict[str, Any]:
    """Accept only what JSON (and PostgreSQL's jsonb) store and give back unchanged.

    Nothing is coerced: a tuple would come back as a list, a set or bytes not at all,
    so they are errors here rather than surprises after a reload.
    """
    _check_json_value(value, "$", 0)
    # Size is measured on the encoding the store sends.
    encoded_size = len(_json_dumps(value).encode())
    if encoded_size > MAX_JSON_BYTES:
        raise ValueError(f"JSON payload is {encoded_size} bytes; at most {MAX_JSON_BYTES} are allowed")
    return value


def _json_dumps(value: Any) -> str:
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def _check_json_value(value: Any, path: str, depth: int) -> None:
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nesting deeper than {MAX_JSON_DEPTH} levels at {path}")
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} at {path} is not valid JSON")
        # jsonb stores numbers as exact decimals: 1e+25 comes back as the int 10**25, which
        # is not equal to the float 1e25. Refuse the floats a reload would change.
        text = repr(value)
        if "e+" in text and int(Decimal(text)) != value:
            raise ValueError(
                f"{text} at {path} would come back from PostgreSQL jsonb as {int(Decimal(text))}, "
                "a different number; store it as an int or a str"
            )
        return
    if isinstance(value, str):
        # jsonb cannot hold U+0000 at all: PostgreSQL rejects the whole value.
        if "\x00" in value:
            raise ValueError(f"string at {path} contains NUL, which PostgreSQL jsonb cannot store")
        return
    if type(value) is list:
        for index, item in enumerate(value):
            _check_json_value(item, f"{path}[{index}]", depth + 1)
        return
    if type(value) is dict:
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"key {key!r} at {path} is not a str; JSON object keys are strings")
            if "\x00" in key:
                raise ValueError(f"key at {path} contains NUL, which PostgreSQL jsonb cannot store")
            _check_json_value(item, f"{path}.{key}", depth + 1)
        return
    raise ValueError(f"{type(value).__name__} at {path} is not JSON (use dict, list, str, int, float, bool or None)")


def check_ip_address(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        address = ip_address(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None
    # Python accepts a zone ("fe80::1%eth0"), PostgreSQL's inet does not: refuse it here
    # rather than fail in the database with a PersistenceError.
    if getattr(address, "scope_id", None) is not None:
        raise ValueError(f"{value!r} has a zone (%...), which PostgreSQL inet cannot store")
    return str(address)


def check_duration_ms(value: object) -> int:
    """Durations are whole, non-negative milliseconds of a plausible size."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"duration must be an int number of milliseconds, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"duration must not be negative, got {value} ms")
    if value > MAX_DURATION_MS:
        raise ValueError(f"duration of {value} ms is implausible (more than {MAX_DURATION_MS} ms)")
    return value


def check_text(value: str) -> str:
    """Text columns of PostgreSQL cannot hold NUL; refuse it before it reaches the database."""
    if "\x00" in value:
        raise ValueError("text contains NUL, which PostgreSQL text cannot store")
    return value


def utc_now() -> datetime:
    return datetime.now(UTC)


def stale_before(now: datetime, session_timeout_secs: float) -> datetime:
    """The last activity a session must have had by ``now`` to be live: older is timed out."""
    return now - timedelta(seconds=session_timeout_secs)


class SessionMetrics(NamedTuple):
    """What a store counts: sessions still marked active, the live ones, and their ages in seconds."""

    total: int
    live: int
    oldest_age: float
    newest_age: float
    average_age: float


def is_live(
    state: SessionState, last_activity: datetime, expires_at: datetime | None, *, now: datetime, stale_before: datetime
) -> bool:
    """The liveness rule: active, last used at ``stale_before`` or later, not past ``expires_at`` at ``now``.

    ``SessionStore``'s SQL applies the same rule (``_LIVE``) to the rows it reads and writes.
    """
    return state is SessionState.ACTIVE and (expires_at is None or expires_at > now) and last_activity >= stale_before


def _as_utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return value.astimezone(UTC)


# Strict str: in lax mode pydantic would silently decode bytes (b"id", {b"key": 1}) to str.
SessionId = Annotated[StrictStr, AfterValidator(check_session_id)]
JsonObject = Annotated[dict[StrictStr, Any], AfterValidator(check_json_object)]
Text = Annotated[StrictStr, AfterValidator(check_text)]
UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]


class Session(BaseModel):
    """One persisted session, field for field what ``public.sessions`` holds."""

    # Frozen: a change must go through the manager, which writes it to the database first.
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    session_id: SessionId
    state: SessionState = SessionState.ACTIVE
    user_id: Text | None = None
    user_type: UserType = UserType.HUMAN
    ip_address: StrictStr | None = None
    user_agent: Text | None = None
    data: JsonObject = Field(default_factory=dict)
    metadata: JsonObject = Field(default_factory=dict)
    request_count: StrictInt = Field(default=0, ge=0)
    total_duration_ms: StrictInt = Field(default=0, ge=0)
    created_at: UtcDatetime = Field(default_factory=utc_now)
    last_activity: UtcDatetime = Field(default_factory=utc_now)
    expires_at: UtcDatetime | None = None
    # 1 when created; every write of the row adds 1 (compare-and-set: update(expected_version=)).
    version: StrictInt = Field(default=1, ge=1)

    @field_validator("ip_address")
    @classmethod
    def _valid_ip(cls, value: str | None) -> str | None:
        return check_ip_address(value)

    def is_live(self, now: datetime, *, stale_before: datetime) -> bool:
        """Whether the session may be used at ``now`` by a manager whose cutoff is ``stale_before`` (``is_live``)."""
        return is_live(self.state, self.last_activity, self.expires_at, now=now, stale_before=stale_before)

    @classmethod
    def from_database(cls, row: Mapping[str, Any]) -> Session:
        """A session from a row of ``public.sessions``, checked where the table is laxer than the model.

        Full validation walks every JSON value, which made recovering 100k sessions three
        times slower than reading them. What jsonb, inet and the table's checks already
        guarantee is not checked again; the id (the table allows control characters), the
        enums and the timestamps are. A ValueError names what is wrong.
        """
        created_at, last_activity, expires_at = row["created_at"], row["last_activity"], row["expires_at"]
        if created_at.tzinfo is None or last_activity.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware")
        return cls._from_checked_fields(
            {
                "session_id": check_session_id(row["session_id"]),
                "state": SessionState(row["state"]),
                "user_id": row["user_id"],
                "user_type": UserType(row["user_type"]),
                "ip_address": _ip_from_database(row["ip_address"]),
                "user_agent": row["user_agent"],
                "data": row["data"],
                "metadata": row["metadata"],
                "request_count": row["request_count"],
                "total_duration_ms": row["total_duration_ms"],
                "created_at": created_at.astimezone(UTC),
                "last_activity": last_activity.astimezone(UTC),
                "expires_at": None if expires_at is None else expires_at.astimezone(UTC),
                "version": row["version"],
            }
        )

    @classmethod
    def _from_checked_fields(cls, fields: dict[str, Any]) -> Session:
        """What ``model_construct(**fields)`` builds from a value for every field, in a third of its time.

        model_construct() looks up the aliases and the default of each field, which took
        most of the time of reading a row. This restores the instance as unpickling does.
        """
        session = cls.__new__(cls)
        session.__setstate__(
            {
                "__dict__": fields,
                "__pydantic_fields_set__": set(fields),
                "__pydantic_extra__": None,
                "__pydantic_private__": None,
            }
        )
        return session


def _ip_from_database(value: str | None) -> str | None:
    """inet text as validation writes it, so that a session read back equals the one created.

    Only IPv6 with an embedded IPv4 part differs: PostgreSQL writes "::ffff:192.0.2.1",
    Python (before 3.13) "::ffff:c000:201".
    """
    if value is not None and ":" in value and "." in value:
        return check_ip_address(value)
    return value


# Events: rows of unified.event_metric_events, field for field (names are the column names).

# bigint and integer columns: a larger Python int is refused here, not by the database.
BIGINT_MAX = 2**63 - 1
INTEGER_MAX = 2**31 - 1


class EventSeverity(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class EventStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    RESOLVED = "resolved"
    CANCELLED = "cancelled"


def check_label(value: str) -> str:
    """Event type, category and source: non-blank text PostgreSQL can store."""
    if not value.strip():
        raise ValueError("must not be empty or blank")
    return check_text(value)


Label = Annotated[StrictStr, AfterValidator(check_label)]
Count = Annotated[StrictInt, Field(ge=0, le=BIGINT_MAX)]


class Event(BaseModel):
    """An event to record in ``unified.event_metric_events``.

    ``event_timestamp=None`` lets the database stamp it with ``unified.clock_now()``; the
    partition it lands in follows that timestamp. The metadata trigger adds
    ``schema_version`` and ``source_system`` to ``event_metadata`` (the caller's keys win).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    event_type: Label
    event_category: Label
    source_system: Label
    event_timestamp: UtcDatetime | None = None
    event_data: JsonObject = Field(default_factory=dict)
    event_metrics: JsonObject = Field(default_factory=dict)
    event_metadata: JsonObject = Field(default_factory=dict)
    # Nullable in the table (rows written by other tools may hold NULL), hence "| None".
    severity: EventSeverity | None = EventSeverity.INFO
    status: EventStatus | None = EventStatus.COMPLETED
    priority: Annotated[StrictInt, Field(ge=0, le=10)] | None = 0
    retry_count: Annotated[StrictInt, Field(ge=0, le=INTEGER_MAX)] = 0
    max_retries: Annotated[StrictInt, Field(ge=0, le=INTEGER_MAX)] = 3
    resolved_at: UtcDatetime | None = None
    duration_ms: Count | None = None
    data_size_bytes: Count | None = None
    response_time_ms: Count | None = None
    correlation_id: Text | None = None
    user_id: Text | None = None
    session_id: Text | None = None


class RecordedEvent(Event):
    """An event as the table holds it, with the values the database assigned."""

    id: UUID
    event_timestamp: UtcDatetime
    created_at: UtcDatetime
    updated_at: UtcDatetime


class RecentEvent(BaseModel):
    """A row of ``unified.mv_recent_events_24h``: an event of the last 24 hours."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: UUID
    event_timestamp: UtcDatetime
    event_type: str
    event_category: str
    source_system: str
    severity: EventSeverity | None
    status: EventStatus | None
    session_id: str | None
    user_id: str | None
    duration_ms: int | None


class ErrorSummary(BaseModel):
    """A row of ``unified.mv_error_summary_7d``: errors per UTC day, type, source and severity."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_day: date
    event_type: str
    source_system: str
    severity: str
    error_count: int
    first_seen_at: UtcDatetime
    last_seen_at: UtcDatetime


class PerformanceMetrics(BaseModel):
    """A row of ``unified.mv_performance_metrics_1h``: durations per type and source in the last hour."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event_type: str
    source_system: str
    event_count: int
    avg_duration_ms: float | None
    p95_duration_ms: float | None
    max_duration_ms: int | None
    avg_response_time_ms: float | None
    p95_response_time_ms: float | None
    max_response_time_ms: int | None
    window_start: UtcDatetime
    window_end: UtcDatetime
