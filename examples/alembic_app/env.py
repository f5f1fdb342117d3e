"""Alembic environment of the example app, configured in code (see ``alembic_config`` in ../test_alembic.py).

Online, it migrates the SQLAlchemy connection the caller passes in
``config.attributes["connection"]`` (Alembic's pattern for sharing a connection) and
makes none itself. Offline (``command.upgrade(config, "head", sql=True)``) it prints the
PostgreSQL SQL instead of running it.
"""

from alembic import context

config = context.config


def run_offline() -> None:
    # No database to ask: the dialect says how to render the SQL.
    context.configure(dialect_name="postgresql", literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError(
            "examples/alembic_app/env.py migrates the SQLAlchemy connection given in "
            "config.attributes['connection'] and opens none itself; see upgrade_head in examples/test_alembic.py"
        )
    context.configure(connection=connection)
    # Inside the caller's transaction (engine.begin()) this adds none: the caller commits.
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
