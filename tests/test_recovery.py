"""assert_full_recovery and the comparison behind it (pure Python, no database)."""

from datetime import UTC, datetime

import pytest

from pytest_exai_sessions import Session, assert_full_recovery, compare_snapshots

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def make(session_id, **fields):
    return Session(session_id=session_id, created_at=T0, last_activity=T0, **fields)


def test_equal_snapshots_pass():
    before = {"a": make("a", data={"x": 1}), "b": make("b")}
    after = {"a": make("a", data={"x": 1}), "b": make("b")}
    assert not compare_snapshots(before, after)
    assert_full_recovery(before, after)


def test_the_message_names_each_missing_extra_and_changed_session():
    before = {
        "gone": make("gone"),
        "same": make("same"),
        "moved": make("moved", request_count=3, data={"k": 1}),
    }
    after = {"same": make("same"), "moved": make("moved", request_count=2, data={"k": 1}), "new": make("new")}

    with pytest.raises(AssertionError) as failure:
        assert_full_recovery(before, after)

    message = str(failure.value)
    assert "3 sessions before: 1 missing, 1 extra, 1 with different fields" in message
    assert "missing after recovery: 'gone'" in message
    assert "extra after recovery: 'new'" in message
    assert "session 'moved' field request_count: before=3 after=2" in message
    assert "same" not in message.replace("'same'", "")  # an equal session is not reported
    assert "session 'same'" not in message


def test_every_persisted_field_is_compared():
    base = make("s")
    variations = {
        "state": "expired",
        "user_id": "u",
        "user_type": "agent",
        "ip_address": "192.0.2.1",
        "user_agent": "curl",
        "data": {"a": 1},
        "metadata": {"m": 1},
        "request_count": 1,
        "total_duration_ms": 5,
        "created_at": datetime(2020, 1, 1, tzinfo=UTC),
        "last_activity": datetime(2020, 1, 1, tzinfo=UTC),
        "expires_at": datetime(2030, 1, 1, tzinfo=UTC),
        "version": 2,
    }
    assert set(variations) == set(Session.model_fields) - {"session_id"}
    for field, value in variations.items():
        diff = compare_snapshots({"s": base}, {"s": Session.model_validate({**base.model_dump(), field: value})})
        assert list(diff.changed["s"]) == [field]


def test_a_long_report_is_cut_with_a_count():
    before = {f"s{i}": make(f"s{i}") for i in range(80)}
    diff = compare_snapshots(before, {})
    lines = diff.lines(limit=50)
    assert len(lines) == 51
    assert lines[-1] == "... and 30 more"
