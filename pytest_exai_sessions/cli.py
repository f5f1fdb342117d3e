"""``exai-sessions migrate|status|maintain|check``: bring a real database to the current schema, keep it up,
and check that its server keeps what it acknowledged."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from .db import DSN_ENV
from .durability import describe, judge, losing, read_settings
from .errors import ExaiSessionsError
from .maintenance import maintain
from .schema import apply_migrations, load_migrations, migration_status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exai-sessions", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("migrate", "apply pending migrations"),
        ("status", "list applied and pending migrations"),
        ("maintain", "create the next months' partitions, apply retention, refresh the views, schedule pg_cron jobs"),
        ("check", "list the server settings under which an acknowledged write can be lost (exit 1 if any)"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--dsn", default=os.environ.get(DSN_ENV), help=f"PostgreSQL DSN [env {DSN_ENV}]")
    commands.choices["migrate"].add_argument(
        "--dry-run", action="store_true", help="print the SQL of pending migrations instead of running it"
    )
    commands.choices["check"].add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for a connection, as the store does [default 5]"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.dsn:
        print(f"exai-sessions: no database given: pass --dsn or set {DSN_ENV}", file=sys.stderr)
        return 2
    try:
        if args.command == "check":
            return _check(args.dsn, timeout=args.timeout)
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            if args.command == "maintain":
                for line in maintain(conn).lines():
                    print(line)
                return 0
            if args.command == "status" or args.dry_run:
                statuses = migration_status(conn, load_migrations())
                for status in statuses:
                    if args.command == "status":
                        state = f"applied {status.applied_at:%Y-%m-%d %H:%M:%S%z}" if status.applied_at else "pending"
                        print(f"{status.migration.filename}: {state}")
                    elif status.applied_at is None:
                        print(f"-- {status.migration.filename}\n{status.migration.sql}")
                return 0
            applied = apply_migrations(conn)
            for migration in applied:
                print(f"applied {migration.filename}")
            if not applied:
                print("nothing to apply: the schema is up to date")
            return 0
    except (ExaiSessionsError, psycopg.Error) as error:
        reason = " ".join(str(error).split())
        print(f"exai-sessions: {reason}", file=sys.stderr)
        return 1


@contextmanager
def _quiet_pool() -> Iterator[None]:
    """Without the pool's warning on each failed connection attempt: the error printed at the end names the last."""
    pool_log = logging.getLogger("psycopg.pool")
    level = pool_log.level
    pool_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        pool_log.setLevel(level)


def _check(dsn: str, *, timeout: float) -> int:
    """Print one line a durability setting, as the store's connections see it; 1 if one loses writes."""
    # psycopg's async connections cannot run on Windows' default (proactor) loop.
    with _quiet_pool(), asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        server = runner.run(read_settings(dsn, timeout=timeout))
    findings = judge(server)
    for line in describe(server.server, findings):
        print(line)
    return 1 if losing(findings) else 0


if __name__ == "__main__":
    sys.exit(main())
