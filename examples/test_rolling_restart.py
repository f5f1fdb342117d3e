"""A rolling deploy of your app, as a test: new replicas start while the old ones serve, then the old ones crash.

``rolling_restart`` sends requests throughout, over whichever replicas are serving, and
checks that every acknowledged request is counted once and that no request on a serving
replica failed. ``handle`` is one request of your app: here a page that adds to a cart.
"""

import pytest

from pytest_exai_sessions.testing.rolling import rolling_restart


async def add_to_cart(manager, session_id):
    """One request: it runs inside ``manager.request`` (which counts it) and merges into the cart."""
    async with manager.request(session_id) as session:
        await manager.merge_data(session_id, {f"item-{session.request_count}": {"qty": 1}})


@pytest.mark.asyncio
async def test_a_rolling_deploy_loses_no_acknowledged_request(crash_harness):
    report = await rolling_restart(crash_harness, old_replicas=2, new_replicas=2, handle=add_to_cart)

    report.assert_ok()  # fails listing each lost request, lost session or failed request
    assert report.acknowledged > 0
    print(report.summary())
