"""The rolling-restart helper: it passes a correct app and names what a broken one loses."""

import pytest

from pytest_exai_sessions.testing.rolling import count_one_request, rolling_restart


@pytest.mark.asyncio
async def test_a_rolling_restart_keeps_every_acknowledged_request(crash_harness):
    report = await rolling_restart(crash_harness, old_replicas=2, new_replicas=3, requests_per_phase=40)

    report.assert_ok()
    # Five phases of 40 requests; only those in flight on the crashed replicas are unaccounted for.
    assert report.acknowledged + report.lost_with_old_replicas == 5 * 40
    assert report.phases == [
        "old serve",
        "new start while old serve",
        "all serve",
        "old crash while all serve",
        "new serve",
    ]
    survivor = await crash_harness.new_manager()
    counted = sum(session.request_count for session in survivor.live_sessions().values())
    assert report.acknowledged <= counted <= report.acknowledged + report.lost_with_old_replicas


async def acknowledge_without_counting(manager, session_id):
    """A broken request handler: the app answers without the request reaching the database."""
    await manager.get(session_id)


@pytest.mark.asyncio
async def test_requests_acknowledged_but_not_counted_are_reported_per_session(crash_harness):
    report = await rolling_restart(
        crash_harness, sessions=3, requests_per_phase=12, handle=acknowledge_without_counting
    )

    assert not report.ok
    assert len(report.violations) == 3
    assert all("request_count is 0, acknowledged requests allow" in line for line in report.violations)
    with pytest.raises(AssertionError, match=r"session 'rolling-0': request_count is 0"):
        report.assert_ok()


class RefusingOnNewReplicas:
    """A request handler whose replicas after the first two (the new ones) refuse every request."""

    def __init__(self):
        self.seen = []

    async def __call__(self, manager, session_id):
        if manager not in self.seen:
            self.seen.append(manager)
        if self.seen.index(manager) >= 2:
            raise RuntimeError("this replica cannot serve")
        await count_one_request(manager, session_id)


@pytest.mark.asyncio
async def test_a_request_failing_on_a_serving_replica_is_a_finding(crash_harness):
    report = await rolling_restart(crash_harness, requests_per_phase=12, handle=RefusingOnNewReplicas())

    assert not report.ok
    assert report.failed_requests and all("this replica cannot serve" in line for line in report.failed_requests)
    with pytest.raises(AssertionError, match="request failed: rolling-"):
        report.assert_ok()


@pytest.mark.asyncio
async def test_bad_arguments_are_refused_before_anything_starts(crash_harness):
    with pytest.raises(ValueError, match="at least 1"):
        await rolling_restart(crash_harness, new_replicas=0)
