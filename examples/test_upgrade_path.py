"""Your data survives the upgrade: a database at an older unified schema, with the app's data, brought up to date.

``factories.database(unified_schema=8, migrations=[...])`` makes a fixture whose databases
hold the unified schema only up to migration 008, then the app's own data as production had
it then. The test applies the pending migrations with the same runner production uses, and
checks that every session and every row that refers to one came through.
"""

from pathlib import Path

import psycopg
import pytest

from pytest_exai_sessions import SessionManager, apply_migrations, load_migrations
from pytest_exai_sessions.plugin import factories

DATA = Path(__file__).with_name("upgrade_data") / "sessions_at_008.sql"

# Built once per run (cached by its own key with --exai-reuse); a fresh clone per test.
at_008_dsn = factories.database(unified_schema=8, migrations=[DATA])
at_008_clock = factories.db_clock(dsn="at_008_dsn")


def versions_applied(dsn: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [v for (v,) in conn.execute("SELECT version FROM exai_schema.applied_migrations ORDER BY version")]


@pytest.mark.asyncio
async def test_sessions_and_the_rows_that_refer_to_them_survive_the_upgrade(at_008_dsn, at_008_clock):
    assert versions_applied(at_008_dsn) == list(range(1, 9))
    at_008_clock.set("2026-06-01T12:00:00Z")  # ten minutes after the data's last activity

    with psycopg.connect(at_008_dsn, autocommit=True) as conn:
        applied = apply_migrations(conn)
    assert [m.version for m in applied] == [m.version for m in load_migrations() if m.version > 8]

    manager = await SessionManager.open(at_008_dsn, clock=at_008_clock)
    try:
        checkout = await manager.get("checkout-7")
        agent = await manager.get("agent-3")
        assert checkout is not None and agent is not None
        assert checkout.data == {"cart": ["sku-1", "sku-2"], "step": "payment"}
        assert (checkout.user_id, checkout.request_count, checkout.version) == ("user-7", 12, 1)
        assert agent.user_type == "agent" and agent.version == 1

        # The upgraded rows take the new features: a compare-and-set write moves the version.
        updated = await manager.update("checkout-7", data={"step": "done"}, expected_version=1)
        assert updated.version == 2
    finally:
        await manager.aclose()

    with psycopg.connect(at_008_dsn) as conn:
        orders = conn.execute("SELECT session_id, total_cents FROM public.orders").fetchall()
    assert orders == [("checkout-7", 4200)]


def test_the_upgrade_is_applied_once(at_008_dsn):
    with psycopg.connect(at_008_dsn, autocommit=True) as conn:
        assert apply_migrations(conn) != []
        assert apply_migrations(conn) == []  # a second replica starting finds nothing to do
    assert versions_applied(at_008_dsn) == [m.version for m in load_migrations()]
