"""Crashes as a property: random operations and crashes against your own manager subclass.

Hypothesis drives the manager with random sequences of create, update_activity, update,
remove, request, get and cleanup, crashes it (``crash_and_restart``) and kills the
database at random points, and after every crash checks the recovered sessions and the
rows of ``public.sessions`` against a plain-Python model of what was acknowledged. A
failure is shrunk to the shortest sequence that still fails, and printed.

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
    # Options of the manager under test: a low limit, so that the run also meets it. The
    # model assumes nothing times out during a run, so keep session_timeout_secs long.
    manager_options: ClassVar[dict[str, Any]] = {"max_concurrent_sessions": 3}
    # How much to try (Hypothesis settings are built from these; override
    # hypothesis_settings() or pass settings= to run_crash_machine for more control).
    max_examples = 15
    stateful_step_count = 15


# A plain (synchronous) test: the machine runs its own event loop, and kills the database
# only on the plugin's temporary server (with --exai-dsn those steps are left out).
def test_shop_sessions_survive_random_crashes(exai_dsn, exai_pg_server, exai_db_clock):
    # clock=: the managers read the test's clock, as the database does.
    run_crash_machine(ShopCrashMachine, exai_dsn, exai_pg_server, clock=exai_db_clock)
