"""An app that migrates its own tables with Alembic: ``alembic upgrade head`` builds the template.

``factories.database(migrations=[upgrade_head])`` makes a fixture whose template holds the
unified schema (``public.sessions``), then whatever ``upgrade_head`` does to it: here it runs
the Alembic environment in ``alembic_app/`` (configured in code, no ``alembic.ini``), which
creates ``public.orders`` referring to the sessions. The template is built once per run;
every test gets a fresh clone of it. ``@cache_inputs`` tells ``--exai-reuse`` to rebuild the
cached template when a file of ``alembic_app/`` changes.

To add a revision: ``command.revision(alembic_config(), "add x", rev_id="0003_x")``.
"""

from pathlib import Path

import pytest

pytest.importorskip("alembic")  # an optional dependency: without it, this module is skipped

import psycopg
from alembic import command
from alembic.config import Config
from psycopg.conninfo import make_conninfo
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from pytest_exai_sessions.plugin import factories
from pytest_exai_sessions.testing import cache_inputs

ALEMBIC_APP = Path(__file__).parent / "alembic_app"


def alembic_config() -> Config:
    config = Config()  # no file: every option is set here
    config.set_main_option("script_location", str(ALEMBIC_APP).replace("%", "%%"))  # options interpolate %
    config.set_main_option("file_template", "%%(rev)s")  # versions/<revision id>.py, as 0001_orders.py
    return config


@cache_inputs(ALEMBIC_APP)
def upgrade_head(conn: psycopg.Connection) -> None:
    """``alembic upgrade head`` into the template database ``conn`` is connected to."""
    # SQLAlchemy cannot take over the plugin's connection (it is inside the plugin's transaction):
    # Alembic gets one of its own to the same database. info.dsn leaves the password out.
    conninfo = make_conninfo(conn.info.dsn, password=conn.info.password)
    # NullPool: no connection stays open afterwards; PostgreSQL clones a template only when
    # nobody is connected to it.
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(conninfo), poolclass=NullPool)
    try:
        with engine.begin() as connection:  # commits Alembic's work when the block ends
            config = alembic_config()
            config.attributes["connection"] = connection  # env.py migrates this connection
            command.upgrade(config, "head")
    finally:
        engine.dispose()


app_dsn = factories.database(migrations=[upgrade_head])
app_clock = factories.db_clock(dsn="app_dsn")
app_manager = factories.session_manager(dsn="app_dsn", clock="app_clock")


def orders_of(conn: psycopg.Connection, session_id: str) -> list[tuple[int, int, str]]:
    query = "SELECT order_id, total_cents, status FROM public.orders WHERE session_id = %s ORDER BY order_id"
    return conn.execute(query, (session_id,)).fetchall()


def test_the_clone_is_at_alembic_head(app_dsn):
    with psycopg.connect(app_dsn) as conn:
        versions = conn.execute("SELECT version_num FROM public.alembic_version").fetchall()
        columns = conn.execute(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name = 'orders' ORDER BY ordinal_position"
        ).fetchall()
    assert versions == [("0002_order_status",)]
    assert [name for (name,) in columns] == ["order_id", "session_id", "total_cents", "status"]


@pytest.mark.asyncio
async def test_removing_a_session_removes_its_orders(app_dsn, app_manager):
    await app_manager.ensure("checkout-7")
    with psycopg.connect(app_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO public.orders (session_id, total_cents) VALUES ('checkout-7', 4200)")
        assert [status for (_, _, status) in orders_of(conn, "checkout-7")] == ["open"]  # the server default

        await app_manager.remove("checkout-7")
        assert await app_manager.get("checkout-7") is None
        assert orders_of(conn, "checkout-7") == []  # ON DELETE CASCADE


# Twice, writing the same order: each run sees only its own row, and order_id 1 (the identity
# starts afresh too). Clones share nothing, whichever runs first, in whichever xdist worker.
@pytest.mark.parametrize("run", ["first", "second"])
@pytest.mark.asyncio
async def test_each_test_starts_from_the_template(app_dsn, app_manager, run):
    await app_manager.ensure("checkout-1")
    with psycopg.connect(app_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO public.orders (session_id, total_cents) VALUES ('checkout-1', 999)")
        assert orders_of(conn, "checkout-1") == [(1, 999, "open")]
