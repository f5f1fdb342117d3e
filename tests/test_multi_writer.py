"""Several replicas write one database at once; some are SIGKILLed; the acknowledged history must hold."""

import pytest
from session_states import row, state

from pytest_exai_sessions.testing.crash import Completed, Invoked, check
from pytest_exai_sessions.testing.crash import History as RecordedHistory
from pytest_exai_sessions.testing.workloads import replica_workload

OPTIONS = {"max_concurrent_sessions": 1000}

# (replicas, kills, replace_killed, seed): 10 + 5 + 5 = 20 kill points in the default run.
DEFAULT_RUNS = [(4, 10, True, 1), (6, 5, False, 2), (3, 5, True, 3)]


@pytest.mark.asyncio
@pytest.mark.parametrize(("replicas", "kills", "replace_killed", "seed"), DEFAULT_RUNS)
async def test_replicas_killed_at_random_points_keep_the_acknowledged_history(
    crash_harness, replicas, kills, replace_killed, seed
):
    report = await crash_harness.run_replicas(
        replica_workload,
        replicas=replicas,
        kills=kills,
        replace_killed=replace_killed,
        seed=seed,
        params={"steps": 15},
        **OPTIONS,
    )

    report.assert_ok()
    assert report.kill_points == kills
    assert report.replicas == replicas + (kills if replace_killed else 0)
    assert report.acknowledged > 0
    assert report.sessions_checked > 0


def test_the_default_run_has_at_least_20_kill_points():
    assert sum(kills for _, kills, _, _ in DEFAULT_RUNS) >= 20


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.parametrize("seed", range(12))
async def test_many_more_multi_writer_trials(crash_harness, seed):
    report = await crash_harness.run_replicas(
        replica_workload,
        replicas=2 + seed % 5,
        kills=3 + seed % 7,
        # Without replacements a run can kill all but one replica at most.
        replace_killed=3 + seed % 7 >= 2 + seed % 5 or seed % 2 == 0,
        seed=100 + seed,
        params={"steps": 20 + seed * 5, "workers": 1 + seed % 3, "merges": 1 + seed % 2, "cas": 1 + seed % 3},
        **OPTIONS,
    )
    report.assert_ok()


@pytest.mark.asyncio
async def test_a_manager_that_merges_by_read_modify_write_is_caught(crash_harness):
    report = await crash_harness.run_replicas(
        replica_workload,
        replicas=4,
        kills=1,
        seed=5,
        params={"steps": 40, "merges": 1},
        manager_class="multi_writer_workloads:ReadModifyWriteMergeManager",
        **OPTIONS,
    )

    assert not report.ok
    merge_violations = report.violations_of("merge-0")
    assert merge_violations
    assert {v.rule for v in report.violations} <= {"merge"}
    assert "acknowledged merge key" in str(merge_violations[0])
    assert " merge_data patch=" in str(merge_violations[0])
    with pytest.raises(AssertionError, match=r"session 'merge-0' \[merge\]"):
        report.assert_ok()


@pytest.mark.asyncio
async def test_reads_after_an_acknowledged_removal_serve_nothing(crash_harness):
    report = await crash_harness.run_replicas("multi_writer_workloads:removal_handshake", replicas=3, kills=0)

    report.assert_ok()
    assert report.sessions_checked == 3  # gone-handshake, seen-1, seen-2


@pytest.mark.asyncio
async def test_a_manager_that_serves_a_cached_copy_is_caught(crash_harness):
    report = await crash_harness.run_replicas(
        "multi_writer_workloads:removal_handshake",
        replicas=3,
        kills=0,
        manager_class="multi_writer_workloads:StaleCacheManager",
    )

    # Both readers were served the session again after replica 0's removal was acknowledged.
    assert [(v.session_id, v.rule) for v in report.violations] == [("gone-handshake", "served after removal")] * 2
    for violation in report.violations:
        removal, read = violation.operations
        assert (removal.replica, removal.name, removal.outcome) == (0, "remove", "ok")
        assert (read.name, read.served) == ("get", True)
        assert read.replica in {1, 2}
        assert read.intent_at > removal.ack_at
    with pytest.raises(AssertionError, match=r"session 'gone-handshake' \[served after removal\]"):
        report.assert_ok()


@pytest.mark.asyncio
async def test_arguments_are_checked(crash_harness):
    with pytest.raises(ValueError, match="one replica is never killed"):
        await crash_harness.run_replicas(replica_workload, replicas=1, kills=1)
    with pytest.raises(ValueError, match="at most replicas - 1"):
        await crash_harness.run_replicas(replica_workload, replicas=3, kills=3, replace_killed=False)


@pytest.mark.asyncio
async def test_a_failing_replica_is_reported_with_its_output(crash_harness):
    with pytest.raises(RuntimeError, match=r"(?s)replica \d failed \(exit 1\).*the workload broke"):
        await crash_harness.run_replicas("multi_writer_workloads:fails", replicas=2, kills=0)


# Hand-made histories: what each rule reports, without child processes.


class History:
    """Builds ledger records as replicas write them; times are the monotonic readings."""

    def __init__(self):
        self.book = RecordedHistory(many_writers=True)
        self.sequences = {}

    def op(self, replica, session_id, name, *, at, ack_at=None, args=None, state=None, outcome="ok", details=None):
        sequence = self.sequences[replica] = self.sequences.get(replica, 0) + 1
        self.book.add(Invoked(replica, sequence, session_id, name, args or {}, None, at=at))
        if ack_at is None:
            return  # in flight
        if outcome == "ok":
            completed = Completed(replica, sequence, session_id, "ok", state, details=details or {}, at=ack_at)
        else:
            completed = Completed(
                replica, sequence, session_id, "fail", reason=outcome, details=details or {}, at=ack_at
            )
        self.book.add(completed)

    def check(self, *rows):
        return check(self.book, {r.session_id: r for r in rows})


def counter_history(final_count, *, in_flight=0):
    history = History()
    history.op(0, "counter-0", "ensure", at=0, ack_at=1, state=state("counter-0"))
    for n in range(1, 4):
        history.op(
            n % 2,
            "counter-0",
            "update_activity",
            at=n * 10,
            ack_at=n * 10 + 1,
            args={"request_duration_ms": 0},
            state=state("counter-0", request_count=n, version=n + 1),
        )
    for n in range(in_flight):
        history.op(2, "counter-0", "update_activity", at=50 + n, args={"request_duration_ms": 0})
    return history.check(row("counter-0", request_count=final_count, version=4 + in_flight))


class TestTheHistoryRules:
    def test_every_acknowledged_increment_is_counted_exactly(self):
        assert counter_history(3).ok
        lost = counter_history(2)
        [violation] = lost.violations
        assert (violation.session_id, violation.rule) == ("counter-0", "increments")
        assert "request_count is 2, but 3 increments were acknowledged" in str(violation)
        assert "replica 1 #1 update_activity request_duration_ms=0: ok -> v2" in str(violation)
        assert "increments" in str(counter_history(4).violations[0])

    def test_a_read_after_an_acknowledged_write_must_see_it(self):
        def history_with_read(served_version, *, read_at):
            history = History()
            history.op(0, "counter-0", "ensure", at=0, ack_at=1, state=state("counter-0"))
            history.op(
                0,
                "counter-0",
                "update_activity",
                at=10,
                ack_at=11,
                args={"request_duration_ms": 0},
                state=state("counter-0", request_count=1, version=2),
            )
            served = state("counter-0", request_count=served_version - 1, version=served_version)
            history.op(1, "counter-0", "get", at=read_at, ack_at=read_at + 1, state=served)
            return history.check(row("counter-0", request_count=1, version=2))

        assert history_with_read(2, read_at=20).ok
        assert history_with_read(1, read_at=5).ok  # started before the write was acknowledged: either
        [violation] = history_with_read(1, read_at=20).violations
        assert (violation.session_id, violation.rule) == ("counter-0", "stale read")
        assert "a get that started after v2 was acknowledged served v1" in str(violation)
        assert [(op.replica, op.name) for op in violation.operations] == [(0, "update_activity"), (1, "get")]

    def test_an_increment_in_flight_may_or_may_not_be_counted(self):
        assert counter_history(3, in_flight=1).ok
        assert counter_history(4, in_flight=1).ok
        assert not counter_history(5, in_flight=1).ok

    def test_two_acknowledged_increments_may_not_return_the_same_count(self):
        history = History()
        history.op(0, "counter-0", "ensure", at=0, ack_at=1, state=state("counter-0"))
        for replica in (0, 1):
            history.op(
                replica,
                "counter-0",
                "update_activity",
                at=10,
                ack_at=11,
                args={"request_duration_ms": 0},
                state=state("counter-0", request_count=1, version=2),
            )
        report = history.check(row("counter-0", request_count=2, version=3))
        assert {v.rule for v in report.violations} == {"increments", "one version, two writes"}
        assert all(len(v.operations) == 2 for v in report.violations)

    def test_every_acknowledged_merge_key_is_present(self):
        history = History()
        history.op(0, "merge-0", "ensure", at=0, ack_at=1, state=state("merge-0"))
        history.op(
            0,
            "merge-0",
            "merge_data",
            at=10,
            ack_at=11,
            args={"patch": {"r0-1": 1}},
            state=state("merge-0", data={"r0-1": 1}, version=2),
        )
        history.op(
            1,
            "merge-0",
            "merge_data",
            at=10,
            ack_at=12,
            args={"patch": {"r1-1": 2}},
            state=state("merge-0", data={"r1-1": 2}, version=3),
        )
        assert history.check(row("merge-0", data={"r0-1": 1, "r1-1": 2}, version=3)).ok
        report = history.check(row("merge-0", data={"r1-1": 2}, version=3))
        [violation] = report.violations
        assert (violation.session_id, violation.rule) == ("merge-0", "merge")
        assert "acknowledged merge key 'r0-1' is missing" in str(violation)
        assert "replica 0 #2 merge_data patch={'r0-1': 1}: ok -> v2" in str(violation)
        unknown = history.check(row("merge-0", data={"r0-1": 1, "r1-1": 2, "r9-9": 0}, version=3))
        assert "keys ['r9-9'] are present, but no operation wrote them" in str(unknown.violations[0])

    def cas_history(self):
        history = History()
        history.op(
            0, "cas-0", "ensure", at=0, ack_at=1, args={"data": {"log": []}}, state=state("cas-0", data={"log": []})
        )
        history.op(
            0,
            "cas-0",
            "update",
            at=10,
            ack_at=11,
            args={"data": {"log": ["r0-1"]}, "expected_version": 1},
            state=state("cas-0", data={"log": ["r0-1"]}, version=2),
        )
        history.op(
            1,
            "cas-0",
            "update",
            at=10,
            ack_at=12,
            args={"data": {"log": ["r1-1"]}, "expected_version": 1},
            outcome="conflict",
            details={"current_version": 2},
        )
        history.op(
            1,
            "cas-0",
            "update",
            at=20,
            ack_at=21,
            args={"data": {"log": ["r0-1", "r1-2"]}, "expected_version": 2},
            state=state("cas-0", data={"log": ["r0-1", "r1-2"]}, version=3),
        )
        history.op(2, "cas-0", "update", at=30, args={"data": {"log": ["r0-1", "r1-2", "r2-1"]}, "expected_version": 3})
        return history

    def test_compare_and_set_writes_are_applied_once_each(self):
        history = self.cas_history()
        assert history.check(row("cas-0", data={"log": ["r0-1", "r1-2"]}, version=3)).ok
        assert history.check(row("cas-0", data={"log": ["r0-1", "r1-2", "r2-1"]}, version=4)).ok  # in flight

        twice = history.check(row("cas-0", data={"log": ["r0-1", "r0-1", "r1-2"]}, version=4))
        assert "write 'r0-1' is in the log 2 times: applied twice" in str(twice.violations[0])
        assert twice.violations[0].session_id == "cas-0"

        lost = history.check(row("cas-0", data={"log": ["r0-1"]}, version=3))
        assert {v.rule for v in lost.violations} == {"compare-and-set log", "last writer"}
        assert "acknowledged write 'r1-2' is lost" in str(lost.violations[0])
        assert "replica 1 #2 update" in str(lost.violations[0])

        refused = history.check(row("cas-0", data={"log": ["r0-1", "r1-2", "r1-1"]}, version=4))
        assert "write 'r1-1' was refused, yet it is in the log" in str(refused.violations[0])
        assert "conflict (current v2)" in str(refused.violations[0])

    def test_a_compare_and_set_returns_the_next_version(self):
        history = History()
        history.op(
            0,
            "cas-0",
            "update",
            at=10,
            ack_at=11,
            args={"data": {"log": ["a"]}, "expected_version": 1},
            state=state("cas-0", data={"log": ["a"]}, version=5),
        )
        report = history.check(row("cas-0", data={"log": ["a"]}, version=5))
        assert "a compare-and-set at v1 returned v5, not v2" in str(report.violations[0])

    def removal_history(self, read_at):
        history = History()
        history.op(0, "gone-0-0-0", "ensure", at=0, ack_at=1, state=state("gone-0-0-0"))
        history.op(0, "gone-0-0-0", "remove", at=10, ack_at=11)
        history.op(1, "gone-0-0-0", "get", at=read_at, ack_at=read_at + 1, state=state("gone-0-0-0"))
        history.op(2, "gone-0-0-0", "request", at=read_at, ack_at=read_at + 1, outcome="not_found")
        return history

    def test_no_replica_serves_a_session_after_its_removal_was_acknowledged(self):
        assert self.removal_history(read_at=10.5).check().ok  # concurrent with the removal: either
        report = self.removal_history(read_at=12).check()
        [violation] = report.violations
        assert (violation.session_id, violation.rule) == ("gone-0-0-0", "served after removal")
        assert [op.name for op in violation.operations] == ["remove", "get"]
        assert "replica 1 #1 get: ok -> v1" in str(violation)

    def test_a_request_served_before_its_counting_failed_counts_as_served(self):
        history = self.removal_history(read_at=5)
        history.op(3, "gone-0-0-0", "request", at=12, ack_at=13, outcome="not_found", details={"served_version": 1})
        assert [v.rule for v in history.check().violations] == ["served after removal"]

    def test_a_removed_session_stays_removed(self):
        report = self.removal_history(read_at=5).check(row("gone-0-0-0"))
        assert [v.rule for v in report.violations] == ["present after removal"]

    def test_a_plain_update_keeps_the_value_of_the_highest_acknowledged_version(self):
        history = History()
        history.op(0, "counter-0", "ensure", at=0, ack_at=1, state=state("counter-0"))
        history.op(
            0,
            "counter-0",
            "update",
            at=10,
            ack_at=12,
            args={"metadata": {"writer": "r0-1"}},
            state=state("counter-0", metadata={"writer": "r0-1"}, version=3),
        )
        history.op(
            1,
            "counter-0",
            "update",
            at=10,
            ack_at=11,
            args={"metadata": {"writer": "r1-1"}},
            state=state("counter-0", metadata={"writer": "r1-1"}, version=2),
        )
        assert history.check(row("counter-0", metadata={"writer": "r0-1"}, version=3)).ok
        report = history.check(row("counter-0", metadata={"writer": "r1-1"}, version=3))
        assert [v.rule for v in report.violations] == ["last writer"]
        assert "replica 0 #2 update metadata={'writer': 'r0-1'}: ok -> v3" in str(report.violations[0])

    def test_an_acknowledged_session_must_survive(self):
        history = History()
        history.op(0, "counter-0", "ensure", at=0, ack_at=1, state=state("counter-0"))
        report = history.check()
        assert [(v.session_id, v.rule) for v in report.violations] == [("counter-0", "lost session")]
        with pytest.raises(AssertionError, match=r"(?s)1 violations.*session 'counter-0' \[lost session\]"):
            report.assert_ok()
