"""``exai-sessions migrate|status|maintain``: bring a real database to the current schema and keep it up."""

from __future__ import annotations

import argparse
import os
import sys

import psycopg

from .db import DSN_ENV
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
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--dsn", default=os.environ.get(DSN_ENV), help=f"PostgreSQL DSN [env {DSN_ENV}]")
    commands.choices["migrate"].add_argument(
        "--dry-run", action="store_true", help="print the SQL of pending migrations instead of running it"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.dsn:
        print(f"exai-sessions: no database given: pass --dsn or set {DSN_ENV}", file=sys.stderr)
        return 2
    try:
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


if __name__ == "__main__":
    sys.exit(main())
