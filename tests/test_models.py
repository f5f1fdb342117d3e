"""The Session record and the rules its fields obey (pure Python, no database)."""

import copy
import json
import pickle
import sys
import unicodedata
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from pytest_exai_sessions import Session, SessionState, UserType
from pytest_exai_sessions.models import (
    MAX_DURATION_MS,
    MAX_ID_LENGTH,
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    check_duration_ms,
    check_ip_address,
    check_session_id,
)


def nested(levels):
    """A JSON object ``levels`` dicts deep: {"a": {"a": ... 0}}."""
    value = 0
    for _ in range(levels):
        value = {"a": value}
    return value


def object_of_size(size):
    """A JSON object whose compact encoding is exactly ``size`` bytes."""
    overhead = len(json.dumps({"x": ""}, separators=(",", ":")))
    return {"x": "a" * (size - overhead)}


# -- defaults and types


def test_a_session_needs_only_an_id():
    session = Session(session_id="s1")

    assert session.state is SessionState.ACTIVE
    assert session.user_type is UserType.HUMAN
    assert session.user_id is session.ip_address is session.user_agent is session.expires_at is None
    assert session.data == {} and session.metadata == {}
    assert session.request_count == session.total_duration_ms == 0
    assert session.created_at.tzinfo is UTC and session.last_activity.tzinfo is UTC


def test_states_and_user_types_are_str_enums():
    session = Session(session_id="s1", state="inactive", user_type="agent")

    assert session.state is SessionState.INACTIVE and session.state == "inactive"
    assert session.user_type is UserType.AGENT and session.user_type == "agent"
    assert [state.value for state in SessionState] == ["active", "inactive", "expired"]
    assert [kind.value for kind in UserType] == ["human", "agent", "system"]


def test_sessions_are_frozen_so_changes_go_through_the_manager():
    session = Session(session_id="s1")

    with pytest.raises(ValidationError, match="frozen"):
        session.data = {"x": 1}


def test_unknown_fields_are_refused():
    with pytest.raises(ValidationError, match="colour"):
        Session(session_id="s1", colour="blue")


@pytest.mark.parametrize("value", [-1, "3", 1.0, True])
def test_counters_are_non_negative_ints(value):
    with pytest.raises(ValidationError):
        Session(session_id="s1", request_count=value)
    with pytest.raises(ValidationError):
        Session(session_id="s1", total_duration_ms=value)


# -- session ids


@pytest.mark.parametrize(
    "session_id",
    ["a", "x" * MAX_ID_LENGTH, "user-42:tab", "sessão-ü", "🙂", "x'); DROP TABLE sessions;--", " padded "],
)
def test_valid_ids(session_id):
    assert check_session_id(session_id) == session_id
    assert Session(session_id=session_id).session_id == session_id


@pytest.mark.parametrize(
    ("session_id", "reason"),
    [
        pytest.param("", "empty or blank", id="empty"),
        pytest.param("   ", "empty or blank", id="blank"),
        pytest.param("x" * (MAX_ID_LENGTH + 1), "256 characters long; at most 255", id="256 characters"),
        pytest.param("a\x00b", r"control character '\\x00' at position 1", id="NUL"),
        pytest.param("a\nb", "control character", id="newline"),
        pytest.param("a\tb", "control character", id="tab"),
        pytest.param("bell\x07", "control character", id="bell"),
        pytest.param("del\x7f", "control character", id="DEL"),
        pytest.param(b"bytes-id", "must be a str, not bytes", id="bytes"),
        pytest.param(42, "must be a str, not int", id="int"),
        pytest.param(None, "must be a str, not NoneType", id="None"),
    ],
)
def test_invalid_ids_say_why(session_id, reason):
    with pytest.raises(ValueError, match=reason):
        check_session_id(session_id)
    with pytest.raises(ValidationError):
        Session(session_id=session_id)


def test_the_control_characters_refused_are_exactly_unicode_category_cc():
    refused = set()
    for code_point in range(sys.maxunicode + 1):
        try:
            check_session_id(f"a{chr(code_point)}")
        except ValueError:
            refused.add(code_point)

    assert refused == {c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) == "Cc"}


# -- JSON fields


def test_json_values_are_kept_exactly():
    data = {
        "str": "text with ünïcode and \"quotes\" and 'apostrophes'",
        "int": 2**70,
        "float": 0.1,
        "small": 1e-7,
        "big float": 1.5e16,
        "bool": True,
        "null": None,
        "list": [1, "two", [3.0], {"four": 4}],
        "empty": {},
    }
    session = Session(session_id="s1", data=data, metadata={"source": "test"})

    assert session.data == data
    assert session.metadata == {"source": "test"}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param({"x": float("nan")}, r"nan at \$\.x is not valid JSON", id="NaN"),
        pytest.param({"x": float("inf")}, r"inf at \$\.x is not valid JSON", id="Infinity"),
        pytest.param({"x": [1, float("-inf")]}, r"at \$\.x\[1\] is not valid JSON", id="-Infinity in a list"),
        pytest.param({"x": {1, 2}}, r"set at \$\.x is not JSON", id="set"),
        pytest.param({"x": frozenset()}, r"frozenset at \$\.x is not JSON", id="frozenset"),
        pytest.param({"x": b"raw"}, r"bytes at \$\.x is not JSON", id="bytes"),
        pytest.param({"x": (1, 2)}, r"tuple at \$\.x is not JSON", id="tuple"),
        pytest.param({"x": datetime(2026, 1, 1, tzinfo=UTC)}, r"datetime at \$\.x is not JSON", id="datetime"),
        pytest.param({"x": object()}, r"object at \$\.x is not JSON", id="object"),
        pytest.param({"x": {2: "two"}}, r"key 2 at \$\.x is not a str", id="nested int key"),
        pytest.param({"x": {None: 1}}, r"key None at \$\.x is not a str", id="nested None key"),
        pytest.param({"x": "a\x00b"}, "contains NUL", id="NUL in a string"),
        pytest.param({"a\x00b": 1}, "contains NUL", id="NUL in a key"),
        pytest.param({"x": 1e25}, "would come back from PostgreSQL jsonb as 10000000000000000000000000", id="1e25"),
        pytest.param(nested(MAX_JSON_DEPTH + 1), f"deeper than {MAX_JSON_DEPTH} levels", id="too deep"),
        pytest.param(
            object_of_size(MAX_JSON_BYTES + 1), f"{MAX_JSON_BYTES + 1} bytes; at most {MAX_JSON_BYTES}", id="too large"
        ),
    ],
)
def test_nothing_is_silently_coerced_to_json(data, reason):
    with pytest.raises(ValidationError, match=reason):
        Session(session_id="s1", data=data)
    with pytest.raises(ValidationError, match=reason):
        Session(session_id="s1", metadata=data)


@pytest.mark.parametrize(
    "data",
    [{1: "one"}, {b"key": "value"}, {None: 1}, {("a", "b"): 1}],
    ids=["int key", "bytes key", "None key", "tuple key"],
)
def test_top_level_keys_must_be_str(data):
    with pytest.raises(ValidationError):
        Session(session_id="s1", data=data)


@pytest.mark.parametrize("data", [[1, 2], "text", 3, None])
def test_data_and_metadata_are_json_objects(data):
    with pytest.raises(ValidationError):
        Session(session_id="s1", data=data)
    with pytest.raises(ValidationError):
        Session(session_id="s1", metadata=data)


def test_json_limits_are_inclusive():
    assert Session(session_id="s1", data=nested(MAX_JSON_DEPTH)).data == nested(MAX_JSON_DEPTH)
    largest = object_of_size(MAX_JSON_BYTES)
    assert Session(session_id="s1", data=largest).data == largest


# -- addresses and text


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::1", "::1"),
        ("2001:DB8:0:0:0:0:0:1", "2001:db8::1"),
        (None, None),
    ],
)
def test_ip_addresses_are_normalised(given, stored):
    assert check_ip_address(given) == stored
    assert Session(session_id="s1", ip_address=given).ip_address == stored


@pytest.mark.parametrize(
    "address", ["", "localhost", "256.1.1.1", "192.0.2.1/24", "1.2.3", "fe80::1%eth0", "::g", b"192.0.2.1"]
)
def test_invalid_ip_addresses_are_refused(address):
    with pytest.raises(ValidationError):
        Session(session_id="s1", ip_address=address)


@pytest.mark.parametrize("field", ["user_id", "user_agent"])
def test_text_fields_are_strict_str_without_nul(field):
    assert getattr(Session(session_id="s1", **{field: "Mozilla/5.0 (ü)"}), field) == "Mozilla/5.0 (ü)"
    with pytest.raises(ValidationError, match="NUL"):
        Session(session_id="s1", **{field: "a\x00b"})
    with pytest.raises(ValidationError):
        Session(session_id="s1", **{field: 42})


@pytest.mark.parametrize("user_type", ["robot", "HUMAN", "", None])
def test_unknown_user_types_are_refused(user_type):
    with pytest.raises(ValidationError, match="user_type"):
        Session(session_id="s1", user_type=user_type)


# -- durations


@pytest.mark.parametrize("value", [0, 1, 1500, MAX_DURATION_MS])
def test_valid_durations(value):
    assert check_duration_ms(value) == value


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (-1, "must not be negative"),
        (MAX_DURATION_MS + 1, "implausible"),
        (10**18, "implausible"),
        (1.5, "must be an int"),
        (2.0, "must be an int"),
        (True, "must be an int"),
        ("10", "must be an int"),
        (None, "must be an int"),
    ],
)
def test_invalid_durations_say_why(value, reason):
    with pytest.raises(ValueError, match=reason):
        check_duration_ms(value)


# -- timestamps


def test_timestamps_are_converted_to_utc_keeping_the_instant():
    paris = timezone(timedelta(hours=1))
    local = datetime(2026, 3, 1, 13, 30, 0, 123456, tzinfo=paris)

    session = Session(session_id="s1", created_at=local, last_activity=local, expires_at=local)

    for value in (session.created_at, session.last_activity, session.expires_at):
        assert value == local
        assert value.tzinfo is UTC
        assert (value.hour, value.microsecond) == (12, 123456)


@pytest.mark.parametrize("field", ["created_at", "last_activity", "expires_at"])
def test_naive_timestamps_are_refused(field):
    with pytest.raises(ValidationError, match="timezone-aware"):
        Session(session_id="s1", **{field: datetime(2026, 1, 1)})


def test_a_session_survives_a_json_round_trip():
    session = Session(
        session_id="s1",
        user_id="u1",
        user_type="agent",
        ip_address="2001:db8::1",
        user_agent="pytest",
        data={"cart": [1, 2]},
        metadata={"schema_version": 1},
        request_count=3,
        total_duration_ms=42,
        expires_at=datetime(2030, 1, 1, tzinfo=UTC),
    )

    assert Session.model_validate_json(session.model_dump_json()) == session


# -- rows read from the database


def database_row(**changes):
    """A row as the store reads it: field names, and timestamps in the connection's time zone."""
    paris = timezone(timedelta(hours=1))
    row = {
        "session_id": "s1",
        "state": "active",
        "user_id": "u1",
        "user_type": "agent",
        "ip_address": "::ffff:192.0.2.1",
        "user_agent": "pytest",
        "data": {"cart": [1, 2]},
        "metadata": {"schema_version": 1},
        "request_count": 3,
        "total_duration_ms": 42,
        "created_at": datetime(2026, 3, 1, 13, 30, tzinfo=paris),
        "last_activity": datetime(2026, 3, 1, 13, 45, tzinfo=paris),
        "expires_at": datetime(2030, 1, 1, tzinfo=paris),
        "version": 4,
    }
    return {**row, **changes}


@pytest.mark.parametrize("changes", [{}, {"expires_at": None, "ip_address": None, "user_id": None}])
def test_a_session_from_a_row_is_the_model_validation_builds(changes):
    row = database_row(**changes)

    session = Session.from_database(row)

    validated = Session(**row)
    assert session == validated
    assert session.__getstate__() == validated.__getstate__()  # fields set, extra, private too
    assert session.state is SessionState.ACTIVE and session.user_type is UserType.AGENT
    assert session.created_at.tzinfo is UTC
    assert pickle.loads(pickle.dumps(session)) == session
    assert copy.deepcopy(session) == session
    with pytest.raises(ValidationError, match="frozen"):
        session.request_count = 4


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"session_id": "bad\x07id"}, "control character"),
        ({"state": "paused"}, "paused"),
        ({"user_type": "robot"}, "robot"),
        ({"created_at": datetime(2026, 1, 1)}, "timezone-aware"),
    ],
)
def test_a_row_the_model_would_refuse_raises_value_error(changes, reason):
    with pytest.raises(ValueError, match=reason):
        Session.from_database(database_row(**changes))
