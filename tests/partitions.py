"""Partition helpers for tests that assert where rows land.

A test database starts with the partitions its template was built with: those of the
months around the instant the run began (or --exai-clock). A test that asserts which rows
fall into the default partition must not depend on that, so it starts from none.
"""

from psycopg import sql

PARENT = "unified.event_metric_events"


def monthly_partitions(conn):
    """Names of the monthly partitions (the default one left out)."""
    return sorted(
        name
        for (name,) in conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = %s::regclass AND pg_get_expr(c.relpartbound, c.oid) <> 'DEFAULT'",
            (PARENT,),
        )
    )


def drop_monthly_partitions(conn):
    """Drop every monthly partition, so that only those the test creates exist."""
    for name in monthly_partitions(conn):
        conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier("unified", name)))
