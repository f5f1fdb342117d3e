"""Crashes as a property: the Hypothesis state machine, its reference model, and a bug it must find."""

import subprocess
import sys
from datetime import UTC, datetime
from typing import Any, ClassVar

import hypothesis
import pytest

from pytest_exai_sessions import Session, SessionLimitExceeded, SessionManager, SessionNotFound
from pytest_exai_sessions.testing.crash import CrashHarness
from pytest_exai_sessions.testing.stateful import SessionCrashMachine, SessionModel, run_crash_machine


def test_the_manager_keeps_every_acknowledged_write_through_random_crashes(exai_dsn, exai_pg_server, exai_db_clock):
    # Random create / update_activity / update / remove / request / get / cleanup, with
    # crash_and_restart and database kills in between; after each crash the recovered
    # sessions and the rows of public.sessions equal the model field for field.
    run_crash_machine(SessionCrashMachine, exai_dsn, exai_pg_server, clock=exai_db_clock)


# A bug on purpose, the one the seed had: requests counted in memory only.
class MemoryCountingManager(SessionManager):
    async def update_activity(self, session_id, request_duration_ms=None):
        current = await self.get(session_id)
        if current is None:
            raise SessionNotFound(session_id)
        counted = current.model_copy(
            update={
                "request_count": current.request_count + 1,
                "total_duration_ms": current.total_duration_ms + (request_duration_ms or 0),
            }
        )
        self._sessions[session_id] = counted
        return counted


class MemoryCountingMachine(SessionCrashMachine):
    manager_class = MemoryCountingManager


@pytest.mark.slow  # about 25 s: shrinking replays a few hundred sequences, each with its crashes
def test_a_lost_write_is_found_and_shrunk_to_a_short_sequence(exai_dsn, exai_pg_server):
    settings = hypothesis.settings(MemoryCountingMachine.hypothesis_settings(), database=None, derandomize=True)

    with pytest.raises(AssertionError) as failure:
        run_crash_machine(MemoryCountingMachine, exai_dsn, exai_pg_server, settings=settings)

    message = str(failure.value)
    assert "request_count" in message, message
    steps = [
        line
        for line in "\n".join(getattr(failure.value, "__notes__", [])).splitlines()
        if line.startswith("state.") and not line.startswith(("state.memory_matches_the_model", "state.teardown"))
    ]
    # The shortest story: a session, a request counted, then something that reads the database.
    assert 2 <= len(steps) <= 4, steps
    assert "update_activity" in "\n".join(steps) or "request" in "\n".join(steps), steps


def test_database_crashes_run_on_the_temporary_server_and_are_left_out_without_it(
    exai_dsn, exai_pg_server, monkeypatch
):
    crashes = []
    original = CrashHarness.crash_database

    def counting(self, mode="kill"):
        crashes.append(mode)
        return original(self, mode)

    monkeypatch.setattr(CrashHarness, "crash_database", counting)
    # Derandomized: a fixed sequence of examples, so whether one kills the database is no matter of luck.
    settings = hypothesis.settings(
        SessionCrashMachine.hypothesis_settings(), max_examples=10, database=None, derandomize=True
    )

    run_crash_machine(SessionCrashMachine, exai_dsn, exai_pg_server, settings=settings)
    assert crashes, "no database crash in 10 examples"
    assert set(crashes) <= {"kill", "immediate"}

    crashes.clear()
    run_crash_machine(SessionCrashMachine, exai_dsn, None, settings=settings)  # as on an external server
    assert crashes == []


def test_a_machine_needs_a_database():
    with pytest.raises(TypeError, match=r"SessionCrashMachine.dsn is not set: run it with run_crash_machine"):
        SessionCrashMachine()


def test_a_short_session_timeout_is_refused(exai_dsn):
    class ShortTimeout(SessionCrashMachine):
        manager_options: ClassVar[dict[str, Any]] = {"session_timeout_secs": 5}

    with pytest.raises(ValueError, match=r"session_timeout_secs=5 is too short for the model"):
        run_crash_machine(ShortTimeout, exai_dsn, settings=hypothesis.settings(max_examples=1, database=None))


def test_the_core_does_not_import_hypothesis():
    code = "import sys, pytest_exai_sessions; assert 'hypothesis' not in sys.modules, 'hypothesis imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# The reference model alone: the manager's contract in plain Python.

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def acknowledged(row, **changes):
    """The Session a correct manager would return for ``row``."""
    values = {
        "session_id": row.session_id,
        "created_at": row.created_at or NOW,
        "last_activity": row.last_activity or NOW,
    }
    values.update({name: getattr(row, name) for name in ("state", "user_type", "data", "metadata", "request_count")})
    values.update(total_duration_ms=row.total_duration_ms, ip_address=row.ip_address, expires_at=row.expires_at)
    values.update(changes)
    return Session(**values)


def test_ensure_creates_or_returns_the_live_session_unchanged():
    model = SessionModel()
    created = model.ensure("a", data={"n": 1}, user_type="agent", ip_address="2001:DB8::1")
    assert (created.data, created.user_type, created.ip_address) == ({"n": 1}, "agent", "2001:db8::1")

    again = model.ensure("a", data={"n": 2})

    assert again is created
    assert again.data == {"n": 1}


def test_update_replaces_only_the_given_fields_and_copies_them():
    model = SessionModel()
    model.ensure("a", data={"n": 1}, metadata={"m": 1}, user_id="u1")
    data = {"n": 2}

    model.update("a", data=data, user_id=None)
    data["n"] = 3  # the caller's dict changes later; the stored row does not

    row = model.rows["a"]
    assert (row.data, row.metadata, row.user_id) == ({"n": 2}, {"m": 1}, "u1")


def test_requests_count_and_durations_add_up():
    model = SessionModel()
    model.ensure("a")
    model.update_activity("a", 5)
    model.update_activity("a")
    model.request("a", 7)
    assert (model.rows["a"].request_count, model.rows["a"].total_duration_ms) == (3, 12)


def test_remove_deletes_and_an_inactive_session_is_gone_until_created_again():
    model = SessionModel()
    model.ensure("a", data={"old": True})
    model.update_activity("a", 1)
    model.update("a", state="inactive")

    assert not model.is_live("a")
    assert "a" in model.rows  # the row stays, marked inactive
    with pytest.raises(SessionNotFound):
        model.update_activity("a")

    restarted = model.ensure("a")
    assert (restarted.data, restarted.request_count) == ({}, 0)

    model.remove("a")
    model.remove("never-there")
    assert model.rows == {}


def test_the_limit_refuses_new_sessions_only():
    model = SessionModel(max_concurrent_sessions=1)
    model.ensure("a")
    assert model.ensure("a").session_id == "a"
    with pytest.raises(SessionLimitExceeded):
        model.ensure("b")
    model.remove("a")
    model.ensure("b")


def test_calls_on_missing_sessions_raise_and_cleanup_removes_nothing():
    model = SessionModel()
    for call in (lambda: model.update("x", data={}), lambda: model.update_activity("x"), lambda: model.request("x", 1)):
        with pytest.raises(SessionNotFound):
            call()
    model.ensure("a")
    assert model.get("x") is None
    assert model.cleanup() == 0
    assert model.is_live("a")


def test_acknowledge_names_each_field_the_manager_got_wrong():
    model = SessionModel()
    row = model.ensure("a", data={"n": 1})
    model.update_activity("a", 4)

    with pytest.raises(AssertionError, match=r"session 'a' .*request_count: model=1 manager=0; total_duration_ms"):
        model.acknowledge(acknowledged(row, request_count=0, total_duration_ms=0))

    model.acknowledge(acknowledged(row))
    assert model.expected_sessions() == {"a": acknowledged(row)}


def test_acknowledge_checks_the_timestamps_move_sensibly():
    model = SessionModel()
    row = model.ensure("a")
    model.acknowledge(acknowledged(row, created_at=NOW, last_activity=NOW))
    later = NOW.replace(minute=5)

    with pytest.raises(AssertionError, match="created_at moved"):
        model.acknowledge(acknowledged(row, created_at=later, last_activity=later))
    with pytest.raises(AssertionError, match="last_activity went back"):
        model.acknowledge(acknowledged(row, last_activity=NOW.replace(year=2029)))
    with pytest.raises(AssertionError, match="though nothing was written"):
        model.acknowledge(acknowledged(row, last_activity=later), touched=False)

    model.acknowledge(acknowledged(row, last_activity=later))
    assert model.rows["a"].last_activity == later


def test_comparisons_list_missing_extra_and_different_sessions():
    model = SessionModel()
    row = model.ensure("a", data={"n": 1})
    model.acknowledge(acknowledged(row))
    expected = model.expected_sessions()

    model.assert_sessions(expected, "memory")
    with pytest.raises(AssertionError, match=r"(?s)recovery differs from the model: .*missing after recovery: 'a'"):
        model.assert_sessions({}, "recovery")
    wrong = {"a": acknowledged(row, data={"n": 2}), "b": acknowledged(row, session_id="b")}
    with pytest.raises(AssertionError, match=r"(?s)extra after recovery: 'b'.*session 'a' field data"):
        model.assert_rows(wrong, "public.sessions")
