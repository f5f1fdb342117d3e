import secrets

import pytest

from pytest_exai_sessions.databases import ForcefulJanitor


@pytest.fixture
def empty_dsn(exai_pg_server):
    """DSN of a new database without the schema, for tests of the migration runner and CLI."""
    server = exai_pg_server
    janitor = ForcefulJanitor(
        user=server.user,
        host=server.host,
        port=server.port,
        password=server.password,
        dbname=f"exai_empty_{secrets.token_hex(4)}",
        maintenance_dbname=server.dbname,
    )
    janitor.init()
    try:
        yield server.dsn(janitor.dbname)
    finally:
        janitor.drop()
