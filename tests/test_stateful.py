"""Crashes as a property: the Hypothesis state machine, its reference model, and a bug it must find."""

import subprocess
import sys
from datetime import UTC, datetime
from typing import Any, ClassVar

import hypothesis
import pytest

from pytest_exai_sessions import Session, SessionConflict, SessionLimitExceeded, SessionManager, SessionNotFound
from pytest_exai_sessions.testing.crash import CrashHarness
from pytest_exai_sessions.testing.stateful import SessionCrashMachine, SessionModel, run_crash_machine


def test_the_manager_keeps_every_acknowledged_write_through_random_crashes(exai_dsn, exai_pg_server, exai_db_clock):
    # Random create / get / update / compare-and-set / merge_data / update_activity / request /
    # remove / cleanup through three replicas, with time passing, a replica's crash_and_restart
    # and database kills in between; every replica serves the model after each step, and after
    # each crash the recovered sessions and the rows of public.sessions equal it field for field.
    run_crash_machine(SessionCrashMachine, exai_dsn, exai_pg_server, clock=exai_db_clock)


INVARIANTS = ("state.every_replica_serves_the_model", "state.teardown")


def shrunk_steps(failure):
    """The steps of the shrunk sequence Hypothesis printed, without the invariant checks."""
    notes = "\n".join(getattr(failure.value, "__notes__", []))
    return [line for line in notes.splitlines() if line.startswith("state.") and not line.startswith(INVARIANTS)]


def derandomized(machine_class, **overrides):
    # No example database: a failure found once must be found again from scratch, the same way.
    return hypothesis.settings(machine_class.hypothesis_settings(), database=None, derandomize=True, **overrides)


# A bug on purpose, the one the seed had: requests counted in the manager's memory only.
class MemoryCountingManager(SessionManager):
    """Keeps a cache of its own and counts requests there: get() serves the count, the database never sees it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.counted = {}

    async def get(self, session_id):
        cached = self.counted.get(session_id)
        if cached is not None and not self.is_session_timed_out(cached):
            return cached
        return await super().get(session_id)

    async def update_activity(self, session_id, request_duration_ms=None):
        current = await self.get(session_id)
        if current is None:
            raise SessionNotFound(session_id)
        # Faithful in every field it returns (the version too): only the database lacks it.
        counted = current.model_copy(
            update={
                "request_count": current.request_count + 1,
                "total_duration_ms": current.total_duration_ms + (request_duration_ms or 0),
                "version": current.version + 1,
            }
        )
        self.counted[session_id] = counted
        return counted


class MemoryCountingMachine(SessionCrashMachine):
    manager_class = MemoryCountingManager
    # The bug needs no database crash; without them each replay while shrinking is cheaper.
    database_crashes = False


@pytest.mark.slow  # about 20 s: shrinking replays a few hundred sequences
def test_a_lost_write_is_found_and_shrunk_to_a_short_sequence(exai_dsn, exai_pg_server, exai_db_clock):
    with pytest.raises(AssertionError) as failure:
        run_crash_machine(
            MemoryCountingMachine,
            exai_dsn,
            exai_pg_server,
            clock=exai_db_clock,
            settings=derandomized(SessionCrashMachine),
        )

    message = str(failure.value)
    assert "request_count" in message, message
    steps = shrunk_steps(failure)
    # The shortest story: a session, a request counted, then a read that reaches the database
    # (another replica's get, or a recovery after a crash).
    assert 2 <= len(steps) <= 4, steps
    assert "update_activity" in "\n".join(steps) or "request" in "\n".join(steps), steps


# A bug only several replicas show: each serves get() from what it last read or wrote itself.
class ReplicaCachingManager(SessionManager):
    """Correct alone (it sees all its own writes); stale as soon as another replica writes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cache = {}

    def _keep(self, session):
        self.cache[session.session_id] = session
        return session

    async def get(self, session_id):
        cached = self.cache.get(session_id)
        if cached is not None:
            return None if self.is_session_timed_out(cached) else cached
        session = await super().get(session_id)
        return None if session is None else self._keep(session)

    async def ensure(self, session_id=None, **attrs):
        return self._keep(await super().ensure(session_id, **attrs))

    async def update(self, session_id, **changes):
        return self._keep(await super().update(session_id, **changes))

    async def merge_data(self, session_id, patch):
        return self._keep(await super().merge_data(session_id, patch))

    async def update_activity(self, session_id, request_duration_ms=None):
        return self._keep(await super().update_activity(session_id, request_duration_ms))

    async def remove(self, session_id):
        self.cache.pop(session_id, None)
        await super().remove(session_id)

    async def cleanup_stale_sessions(self):
        self.cache.clear()  # what it expires, it no longer serves
        return await super().cleanup_stale_sessions()


class ReplicaCachingMachine(SessionCrashMachine):
    manager_class = ReplicaCachingManager


class SingleReplicaCachingMachine(ReplicaCachingMachine):
    replicas = 1


class QuickReplicaCachingMachine(ReplicaCachingMachine):
    # Two replicas show it; without database restarts each replay while shrinking is cheaper.
    replicas = 2
    database_crashes = False


def test_a_replica_serving_its_own_stale_copy_is_found(exai_dsn, exai_pg_server, exai_db_clock):
    # Found, not shrunk (shrinking is the slow test below): a few examples are enough.
    settings = derandomized(ReplicaCachingMachine, phases=[hypothesis.Phase.generate], max_examples=5)

    with pytest.raises(AssertionError, match=r"through replica \d"):
        run_crash_machine(ReplicaCachingMachine, exai_dsn, exai_pg_server, clock=exai_db_clock, settings=settings)


@pytest.mark.slow  # about 20 s: shrinking replays a few hundred sequences
def test_a_stale_replica_is_shrunk_to_one_write_after_the_first_session(exai_dsn, exai_pg_server, exai_db_clock):
    with pytest.raises(AssertionError) as failure:
        run_crash_machine(
            QuickReplicaCachingMachine,
            exai_dsn,
            exai_pg_server,
            clock=exai_db_clock,
            settings=derandomized(QuickReplicaCachingMachine),
        )

    assert "through replica 1" in str(failure.value), failure.value
    steps = shrunk_steps(failure)
    # A session, then one write through replica 0, which replica 1 (that read it) does not see.
    assert len(steps) == 2, steps
    assert all("replica=0" in step for step in steps), steps


@pytest.mark.slow  # about 10 s: a full run that passes, every example
def test_the_stale_replica_bug_needs_several_replicas_to_show(exai_dsn, exai_pg_server, exai_db_clock):
    # Alone, the cache sees every write: the machine with one replica finds nothing, so the
    # failure above is the replicas' doing.
    run_crash_machine(
        SingleReplicaCachingMachine,
        exai_dsn,
        exai_pg_server,
        clock=exai_db_clock,
        settings=derandomized(SingleReplicaCachingMachine),
    )


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
    # Short sequences: the question is only whether crash_database runs, not what it finds.
    settings = derandomized(SessionCrashMachine, max_examples=10, stateful_step_count=10)

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


def test_a_machine_needs_at_least_one_replica(exai_dsn):
    class NoReplicas(SessionCrashMachine):
        replicas = 0

    with pytest.raises(ValueError, match=r"NoReplicas.replicas must be a whole number >= 1, got 0"):
        run_crash_machine(NoReplicas, exai_dsn, settings=hypothesis.settings(max_examples=1, database=None))


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
    values.update(version=row.version)
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


def test_every_write_adds_one_to_the_version_and_reads_add_nothing():
    model = SessionModel()
    assert model.ensure("a").version == 1
    model.ensure("a")  # the live session, unchanged
    model.get("a")
    model.update("a")  # no field given: last_activity is still written
    model.update("a", data={"n": 1})
    model.merge_data("a", {})
    model.update_activity("a")
    assert model.rows["a"].version == 5


def test_merge_data_merges_top_level_keys_and_copies_the_patch():
    model = SessionModel()
    model.ensure("a", data={"keep": 1, "replace": {"old": True}})
    patch = {"replace": {"new": True}, "add": [1]}

    model.merge_data("a", patch)
    patch["add"].append(2)  # the caller's patch changes later; the stored row does not

    assert model.rows["a"].data == {"keep": 1, "replace": {"new": True}, "add": [1]}
    with pytest.raises(SessionNotFound):
        model.merge_data("missing", {"k": 1})


def test_compare_and_set_writes_at_the_current_version_only():
    model = SessionModel()
    model.ensure("a", data={"n": 1})
    model.update("a", data={"n": 2}, expected_version=1)

    with pytest.raises(SessionConflict) as conflict:
        model.update("a", data={"n": 3}, expected_version=1)

    assert (conflict.value.expected_version, conflict.value.current_version) == (1, 2)
    assert (model.rows["a"].data, model.rows["a"].version) == ({"n": 2}, 2)  # nothing written


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
    # A restarted id goes on from the old row's version (3: created, counted, made inactive).
    assert (restarted.data, restarted.request_count, restarted.version) == ({}, 0, 4)

    model.remove("a")
    model.remove("never-there")
    assert model.rows == {}
    assert model.ensure("a").version == 1  # no row left to go on from


def test_the_limit_refuses_new_sessions_only():
    model = SessionModel(max_concurrent_sessions=1)
    model.ensure("a")
    assert model.ensure("a").session_id == "a"
    with pytest.raises(SessionLimitExceeded):
        model.ensure("b")
    model.remove("a")
    model.ensure("b")


def test_calls_on_missing_sessions_raise_and_cleanup_expires_nothing_before_time_passes():
    model = SessionModel()
    for call in (lambda: model.update("x", data={}), lambda: model.update_activity("x"), lambda: model.request("x", 1)):
        with pytest.raises(SessionNotFound):
            call()
    model.ensure("a")
    assert model.get("x") is None
    assert model.cleanup() == 0
    assert model.is_live("a")


def test_time_passing_times_out_every_live_session_and_cleanup_expires_them():
    model = SessionModel(max_concurrent_sessions=1)
    model.ensure("a")
    model.time_passes()

    assert model.get("a") is None
    with pytest.raises(SessionNotFound):
        model.update("a", data={})
    model.ensure("b")  # a timed-out session holds no place under the limit
    row_a = model.rows["a"]
    assert (row_a.state, row_a.version) == ("active", 1)  # still marked active until cleanup

    assert model.cleanup() == 1
    assert (row_a.state, row_a.version) == ("expired", 2)
    assert model.cleanup() == 0
    assert model.is_live("b")


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
