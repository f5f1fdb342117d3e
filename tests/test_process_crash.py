"""Process crashes with an acknowledgement ledger: SIGKILL the application, lose nothing it acknowledged."""

import pytest

from pytest_exai_sessions import Session
from pytest_exai_sessions.testing.crash import Completed, History, Invoked, check
from pytest_exai_sessions.testing.workloads import mixed_workload

# 24 kill points spread over a mixed workload of 3 concurrent workers.
KILL_POINTS = [1, 2, 3, 5, 8, 12, 16, 20, 25, 30, 36, 42, 50, 58, 66, 75, 85, 95, 110, 125, 140, 160, 180, 200]


@pytest.mark.asyncio
@pytest.mark.parametrize("acks", KILL_POINTS)
async def test_no_acknowledged_write_is_lost_at_any_kill_point(crash_harness, acks):
    report = await crash_harness.run_and_kill(
        mixed_workload, kill_after_acks=acks, params={"seed": acks}, max_concurrent_sessions=1000
    )

    report.assert_ok()
    assert report.acknowledged >= acks
    assert report.sessions_checked > 0


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.parametrize("seed", range(40))
async def test_many_more_kill_points(crash_harness, seed):
    report = await crash_harness.run_and_kill(
        mixed_workload,
        kill_after_acks=5 + seed * 9,
        params={"seed": 1000 + seed, "workers": 1 + seed % 5, "sessions": 5 + seed % 20},
        max_concurrent_sessions=1000,
    )
    report.assert_ok()


@pytest.mark.asyncio
async def test_kill_after_a_delay(crash_harness):
    report = await crash_harness.run_and_kill(mixed_workload, kill_after_secs=0.8, max_concurrent_sessions=1000)
    report.assert_ok()
    assert report.killed_at == "after 0.8s"
    assert report.acknowledged > 0


@pytest.mark.asyncio
async def test_kill_at_a_named_fault_point(crash_harness):
    report = await crash_harness.run_and_kill("crash_workloads:counting_with_a_fault_point", kill_at="halfway")

    report.assert_ok()
    assert report.killed_at == "at fault point 'halfway'"
    assert report.fault_points == ["halfway"]
    # Stopped exactly there: 10 creations and 5 rounds of 10 requests, nothing in flight.
    assert (report.acknowledged, report.in_flight) == (60, 0)


@pytest.mark.asyncio
async def test_an_application_operation_with_its_own_expectations(crash_harness):
    report = await crash_harness.run_and_kill("crash_workloads:application_operations", kill_after_acks=30)
    report.assert_ok()
    assert report.sessions_checked == 1


@pytest.mark.asyncio
async def test_a_manager_that_acknowledges_unwritten_requests_is_caught(crash_harness):
    report = await crash_harness.run_and_kill(
        "crash_workloads:counting", kill_after_acks=40, manager_class="crash_workloads:ForgetfulManager"
    )

    assert not report.ok
    assert {v.session_id for v in report.violations} == {f"f{n}" for n in range(5)}
    with pytest.raises(AssertionError) as failure:
        report.assert_ok()
    message = str(failure.value)
    assert "session 'f0':" in message
    assert "request_count: acknowledged=" in message


@pytest.mark.asyncio
async def test_a_workload_that_ends_before_the_kill_point_is_an_error(crash_harness):
    with pytest.raises(RuntimeError, match=r"(?s)ended \(exit 0\) before the kill point.*the workload is done"):
        await crash_harness.run_and_kill("crash_workloads:finishes_quickly", kill_after_acks=100)


@pytest.mark.asyncio
async def test_arguments_are_checked(crash_harness):
    with pytest.raises(ValueError, match="exactly one of"):
        await crash_harness.run_and_kill(mixed_workload, kill_after_acks=1, kill_after_secs=1)
    with pytest.raises(ValueError, match="module-level function"):
        await crash_harness.run_and_kill(lambda ctx: None, kill_after_acks=1)


def state(session_id, **fields):
    base = {
        "session_id": session_id,
        "state": "active",
        "user_id": None,
        "user_type": "human",
        "ip_address": None,
        "user_agent": None,
        "data": {},
        "metadata": {},
        "request_count": 0,
        "total_duration_ms": 0,
        "created_at": "2026-01-01T00:00:00Z",
        "last_activity": "2026-01-01T00:00:00Z",
        "expires_at": None,
        "version": 1,
    }
    return {**base, **fields}


def session(**fields):
    return Session.model_validate(state(**fields))


class Book:
    """A one-writer history and the fault that ended it, checked against recovered rows."""

    def __init__(self, history):
        self.history = history

    def check(self, rows, _where_it_was_killed):
        return check(self.history, rows)


class TestTheLedgerRules:
    """What counts as a violation, without a database: the rules on their own."""

    def book(self, *records):
        history = History()
        history.add_all(records)
        return Book(history)

    def intent(self, seq, sid, op, args=None, expect=None):
        return Invoked(0, seq, sid, op, args or {}, expect, at=seq)

    def ack(self, seq, sid, state):
        return Completed(0, seq, sid, "ok", state, at=seq + 0.5)

    def test_an_acknowledged_state_must_come_back_exactly(self):
        book = self.book(
            self.intent(1, "a", "update_activity", {"request_duration_ms": 5}),
            self.ack(1, "a", state("a", request_count=1, total_duration_ms=5)),
        )
        assert book.check({"a": session(session_id="a", request_count=1, total_duration_ms=5)}, "x").ok
        lost = book.check({"a": session(session_id="a")}, "x")
        assert [str(v) for v in lost.violations] == [
            "session 'a': request_count: acknowledged=1 recovered=0; total_duration_ms: acknowledged=5 recovered=0"
        ]
        assert "acknowledged, but missing" in str(book.check({}, "x").violations[0])

    def test_a_write_in_flight_is_wholly_present_or_wholly_absent(self):
        book = self.book(
            self.intent(1, "a", "ensure", expect={"state": "active"}),
            self.ack(1, "a", state("a", request_count=2, total_duration_ms=10)),
            self.intent(2, "a", "update_activity", {"request_duration_ms": 7}),
        )
        absent = session(session_id="a", request_count=2, total_duration_ms=10)
        present = session(
            session_id="a", request_count=3, total_duration_ms=17, last_activity="2026-01-02T00:00:00Z", version=2
        )
        half = session(session_id="a", request_count=3, total_duration_ms=10, version=2)
        assert book.check({"a": absent}, "x").ok
        assert book.check({"a": present}, "x").ok
        assert "wholly applied" in str(book.check({"a": half}, "x").violations[0])

    def test_an_update_in_flight_may_not_be_half_applied(self):
        book = self.book(
            self.intent(1, "a", "ensure", expect={"state": "active"}),
            self.ack(1, "a", state("a")),
            self.intent(2, "a", "update", expect={"data": {"x": 1}, "metadata": {"y": 2}}),
        )
        assert book.check({"a": session(session_id="a", data={"x": 1}, metadata={"y": 2}, version=2)}, "x").ok
        assert not book.check({"a": session(session_id="a", data={"x": 1}, version=2)}, "x").ok
        # Every write moves the version: the update applied without it is not the update.
        assert not book.check({"a": session(session_id="a", data={"x": 1}, metadata={"y": 2})}, "x").ok

    def test_a_removed_session_must_stay_removed(self):
        book = self.book(
            self.intent(1, "a", "remove"),
            self.ack(1, "a", None),
        )
        assert book.check({}, "x").ok
        assert "removed" in str(book.check({"a": session(session_id="a")}, "x").violations[0])
