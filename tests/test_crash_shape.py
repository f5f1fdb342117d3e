"""One shape for every crash test: the checker's three outcomes, rows nothing explains, and one
meaning of "after N acknowledged operations" in both runners."""

import crash_workloads
import pytest
from session_states import row, state

from pytest_exai_sessions.testing.crash import Completed, History, Invoked, check, decode, encode
from pytest_exai_sessions.testing.crash.driver import ReplicaPlan
from pytest_exai_sessions.testing.workloads import mixed_workload


def rows(*sessions):
    return {session.session_id: session for session in sessions}


def history_of(*records, many_writers=False):
    history = History(many_writers=many_writers)
    history.add_all(records)
    return history


def created(session_id, *, replica=0, sequence=1):
    """An ensure that was acknowledged with the session at v1."""
    return [
        Invoked(replica, sequence, session_id, "ensure", {}, {"state": "active"}, at=sequence),
        Completed(replica, sequence, session_id, "ok", state(session_id), at=sequence + 0.5),
    ]


def update(session_id, outcome, *, replica=0, sequence=2, **changes):
    """An update of ``changes``, answered with ``outcome`` (None: never answered)."""
    records = [Invoked(replica, sequence, session_id, "update", changes, changes, at=sequence)]
    if outcome == "ok":
        records.append(
            Completed(replica, sequence, session_id, "ok", state(session_id, **changes, version=2), at=sequence + 0.5)
        )
    elif outcome == "fail":
        records.append(Completed(replica, sequence, session_id, "fail", reason="conflict", at=sequence + 0.5))
    elif outcome == "uncertain":
        records.append(
            Completed(replica, sequence, session_id, "uncertain", reason="PersistenceError: lost", at=sequence + 0.5)
        )
    return records


BOTH_RULE_SETS = pytest.mark.parametrize("many_writers", [False, True], ids=["one writer", "many writers"])


class TestTheThreeOutcomes:
    @BOTH_RULE_SETS
    def test_an_ok_write_must_be_present(self, many_writers):
        history = history_of(*created("a"), *update("a", "ok", metadata={"m": 1}), many_writers=many_writers)

        assert check(history, rows(row("a", metadata={"m": 1}, version=2))).ok
        lost = check(history, rows(row("a")))  # the update is gone
        missing = check(history, {})  # the session is gone
        assert {v.session_id for v in lost.violations} == {"a"}
        assert {v.session_id for v in missing.violations} == {"a"}

    @BOTH_RULE_SETS
    def test_a_failed_write_must_be_absent(self, many_writers):
        history = history_of(*created("a"), *update("a", "fail", metadata={"m": 1}), many_writers=many_writers)

        report = check(history, rows(row("a")))
        assert report.ok
        assert (report.acknowledged, report.uncertain, report.in_flight) == (2, 0, 0)
        applied = check(history, rows(row("a", metadata={"m": 1}, version=2)))
        assert {v.session_id for v in applied.violations} == {"a"}

    @pytest.mark.parametrize("outcome", ["uncertain", None], ids=["uncertain", "in flight"])
    @BOTH_RULE_SETS
    def test_an_uncertain_write_may_be_present_or_absent_but_never_half(self, many_writers, outcome):
        changes = {"metadata": {"m": 1}, "user_id": "u"}
        history = history_of(*created("a"), *update("a", outcome, **changes), many_writers=many_writers)

        absent = check(history, rows(row("a")))
        present = check(history, rows(row("a", **changes, version=2)))
        assert absent.ok and present.ok
        assert (present.uncertain, present.in_flight) == ((1, 0) if outcome else (0, 1))
        half = check(history, rows(row("a", metadata={"m": 1}, version=2)))
        assert not half.ok

    def test_the_history_crosses_the_pipe_as_it_was_written(self):
        records = [*created("a"), *update("a", "uncertain", metadata={"m": 1})]
        assert [decode(encode(record)) for record in records] == records
        with pytest.raises(ValueError, match="not a workload record"):
            decode(b'{"t": "ack"}\n')


class TestRowsNothingExplains:
    @BOTH_RULE_SETS
    def test_a_row_no_recorded_write_made_is_a_violation(self, many_writers):
        history = history_of(*created("a"), many_writers=many_writers)

        report = check(history, rows(row("a"), row("ghost")))
        [violation] = report.violations
        assert (violation.session_id, violation.rule) == ("ghost", "unexplained row")
        assert "no recorded operation wrote it" in str(violation)
        assert report.sessions_checked == 1

    def test_rows_there_before_the_workload_are_explained_by_that_state(self):
        history = history_of(*created("a"))
        seeded = row("seeded", data={"kept": True})

        assert check(history, rows(row("a"), seeded), initial=rows(seeded)).ok
        changed = check(history, rows(row("a"), row("seeded", data={"kept": False})), initial=rows(seeded))
        [violation] = changed.violations
        assert (violation.session_id, violation.rule) == ("seeded", "unexplained row")
        assert "changed, but no recorded operation touched it: data:" in str(violation)

    def test_a_seeded_row_that_vanishes_is_a_violation(self):
        history = history_of(*created("a"))
        seeded = row("seeded")

        [violation] = check(history, rows(row("a")), initial=rows(seeded)).violations
        assert (violation.session_id, violation.rule) == ("seeded", "unexplained row")
        assert "missing after recovery" in str(violation)


@pytest.mark.asyncio
async def test_the_harness_reports_a_session_the_workload_wrote_behind_the_historys_back(crash_harness):
    seeded = await crash_harness.new_manager()
    await seeded.ensure("seeded-before", data={"kept": True})  # there before: explained

    report = await crash_harness.run_and_kill("crash_workloads:writes_outside_the_history", kill_after_acks=10)

    assert [(v.session_id, v.rule) for v in report.violations] == [("ghost", "unexplained row")]
    assert report.sessions_checked == 1


@pytest.mark.asyncio
async def test_writes_whose_answer_was_lost_are_uncertain_and_may_have_taken_effect(crash_harness):
    report = await crash_harness.run_and_kill(
        "crash_workloads:updates_whose_answer_is_lost",
        kill_at="five",
        manager_class="crash_workloads:AnswerLostManager",
    )

    report.assert_ok()  # all five took effect, none was acknowledged: allowed
    assert (report.acknowledged, report.uncertain, report.in_flight) == (1, 5, 0)


@pytest.mark.asyncio
async def test_after_n_acknowledged_operations_counts_refusals_in_one_child(crash_harness):
    report = await crash_harness.run_and_kill("crash_workloads:refusals_between_writes", kill_after_acks=7)

    report.assert_ok()
    # ensure, then (refused, written) pairs: the 7th answer is a refusal, and it counted.
    assert report.killed_at == "after 7 acknowledged operations"


@pytest.mark.asyncio
async def test_after_n_acknowledged_operations_counts_refusals_in_the_replicas_too(crash_harness):
    plan = ReplicaPlan.draw(replicas=2, kills=1, replace_killed=False, seed=4, steps=12)
    [[kill_after]] = [kills for kills in plan.kills_per_slot if kills]

    report = await crash_harness.run_replicas(
        "crash_workloads:refusals_between_writes_per_replica",
        replicas=2,
        kills=1,
        replace_killed=False,
        seed=4,
        params={"steps": 12},
    )

    report.assert_ok()
    assert report.killed == [f"replica 1 after {kill_after} acknowledged operations"]


@pytest.mark.asyncio
async def test_a_workload_in_this_process_goes_through_the_same_driver_and_checker(crash_harness):
    report = await crash_harness.run_and_abandon(
        mixed_workload, kill_after_acks=40, params={"seed": 3}, max_concurrent_sessions=1000
    )

    report.assert_ok()
    assert report.killed_at == "after 40 acknowledged operations"
    assert report.acknowledged >= 40 and report.sessions_checked > 0


@pytest.mark.asyncio
async def test_in_this_process_a_fault_point_and_a_closure_work_too(crash_harness):
    async def counting(ctx):  # not importable: fine in this process
        await crash_workloads.counting_with_a_fault_point(ctx)

    report = await crash_harness.run_and_abandon(counting, kill_at="halfway")

    report.assert_ok()
    assert report.fault_points == ["halfway"]
    assert (report.acknowledged, report.in_flight) == (60, 0)


@pytest.mark.asyncio
async def test_in_this_process_a_manager_that_acknowledges_unwritten_requests_is_caught(crash_harness):
    report = await crash_harness.run_and_abandon(
        "crash_workloads:counting", kill_after_acks=40, manager_class="crash_workloads:ForgetfulManager"
    )

    assert {v.session_id for v in report.violations} == {f"f{n}" for n in range(5)}


@pytest.mark.asyncio
async def test_in_this_process_a_workload_that_fails_raises_its_error(crash_harness):
    async def broken(ctx):
        await ctx.ensure("only")
        raise RuntimeError("the workload broke")

    with pytest.raises(RuntimeError, match="the workload broke"):
        await crash_harness.run_and_abandon(broken, kill_after_acks=100)
