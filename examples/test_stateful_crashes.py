"""Crashes as a property: random operations and crashes against your own manager subclass.

Hypothesis drives three replicas of the manager on one database with random sequences of
create, get, update (also compare-and-set, ``expected_version=``), merge_data,
update_activity, request, remove and cleanup, each through a replica it picks; it crashes
a replica (``crash_and_restart``), kills the database and moves the clock past the session
timeout at random points. After every step each replica must serve what a plain-Python
model of the acknowledged writes says (``version`` included), and after every crash the
recovered sessions and the rows of ``public.sessions`` must equal it. A failure is shrunk
to the shortest sequence that still fails, and printed.

Needs Hypothesis: ``pip install "pytest-exai-sessions[stateful]"``.
"""

from typing import Any, ClassVar

import pytest

pytest.importorskip("hypothesis", reason='needs Hypothesis: pip install "pytest-exai-sessions[stateful]"')

from pytest_exai_sessions import SessionManager
from pytest_exai_sessions.testing.stateful import SessionCrashMachine, SessionModel, run_crash_machine


class ShopSessionManager(SessionManager):
    """An application's manager: every new session is tagged with the shop it belongs to."""

    async def ensure(self, session_id=None, **attrs):
        attrs.setdefault("metadata", {"shop": "main"})
        return await super().ensure(session_id, **attrs)


class ShopSessionModel(SessionModel):
    """The model learns what the subclass adds, so it can predict every field exactly."""

    def ensure(self, session_id, **attrs):
        if attrs.get("metadata") is None:
            attrs["metadata"] = {"shop": "main"}
        return super().ensure(session_id, **attrs)


class ShopCrashMachine(SessionCrashMachine):
    manager_class = ShopSessionManager
    model_class = ShopSessionModel
    # Options of every replica: a low limit (for all of them together), so that the run also
    # meets it. Sessions time out only when the machine moves the clock, so keep
    # session_timeout_secs long.
    manager_options: ClassVar[dict[str, Any]] = {"max_concurrent_sessions": 3}
    # How many managers share the database, as your service's replicas would (the default, 3).
    replicas = 3
    # How much to try (Hypothesis settings are built from these; override
    # hypothesis_settings() or pass settings= to run_crash_machine for more control).
    max_examples = 15
    stateful_step_count = 15


# A plain (synchronous) test: the machine runs its own event loop, and kills the database
# only on the plugin's temporary server (with --exai-dsn those steps are left out).
def test_shop_sessions_survive_random_crashes(exai_dsn, exai_pg_server, exai_db_clock):
    # clock=: the managers read the test's clock, as the database does.
    run_crash_machine(ShopCrashMachine, exai_dsn, exai_pg_server, clock=exai_db_clock)
