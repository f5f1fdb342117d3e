"""The schema's upkeep, run once: next months' partitions, retention, the views, the pg_cron jobs.

The work itself is SQL of migration 010 (``unified.create_upcoming_partitions()``,
``unified.apply_retention()``, ``unified.refresh_materialized_views()``), the same functions
the pg_cron jobs call, reading the same ``unified.maintenance_settings`` row. This module
runs them for a database without pg_cron (system cron, a Kubernetes CronJob, CI, or the
application itself) and schedules the pg_cron jobs where pg_cron was installed after the
schema.

Each step is one transaction that takes a transaction-level advisory lock first, and nothing
is kept in the session between them (no session lock, setting or prepared statement): two
runs at once take turns, also through a pooler in transaction mode.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from .errors import PersistenceError

# An arbitrary constant: every maintenance run, in any process, takes the same lock.
ADVISORY_LOCK_KEY = int.from_bytes(b"exai-mnt", "big") >> 1  # shifted to fit a signed bigint

PARTITIONS = "partitions"
RETENTION = "retention"
VIEWS = "views"
JOBS = "pg_cron jobs"

# Each step's statements, run in one transaction; the last one's rows are the step's result.
_STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (PARTITIONS, ("SELECT name FROM unified.create_upcoming_partitions() AS name",)),
    (RETENTION, ("SELECT name FROM unified.apply_retention() AS name",)),
    (
        VIEWS,
        (
            "SELECT unified.refresh_materialized_views()",
            # What the function refreshes: every materialized view of the schema.
            "SELECT format('%I.%I', schemaname, matviewname) FROM pg_catalog.pg_matviews"
            " WHERE schemaname = 'unified' ORDER BY 1",
        ),
    ),
    (
        JOBS,
        (
            "SELECT format('%s (%s, jobid %s): %s', job_name, schedule, coalesce(job_id::text, 'none'), action)"
            " FROM unified.schedule_maintenance_jobs()",
        ),
    ),
)
_NEEDED = "unified.schedule_maintenance_jobs()"  # of migration 010, the last of the functions the steps call


@dataclass(frozen=True)
class MaintenanceReport:
    """What one run did. ``skipped``: steps another runner was doing at that moment (``wait=False``)."""

    partitions_created: tuple[str, ...] = ()
    partitions_dropped: tuple[str, ...] = ()
    views_refreshed: tuple[str, ...] = ()
    jobs: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        """The report as ``exai-sessions maintain`` prints it."""

        def listed(names: tuple[str, ...]) -> str:
            return ", ".join(names) if names else "none"

        lines = [
            f"partitions created: {listed(self.partitions_created)}",
            f"partitions dropped: {listed(self.partitions_dropped)}",
            f"views refreshed: {listed(self.views_refreshed)}",
        ]
        if self.jobs:
            lines += [f"pg_cron job {job}" for job in self.jobs]
        else:
            lines.append("pg_cron jobs: none (pg_cron is not installed in this database)")
        lines += [f"skipped {step}: another runner was doing it" for step in self.skipped]
        return lines


def maintain(conn: psycopg.Connection, *, wait: bool = True) -> MaintenanceReport:
    """Run each maintenance step once on ``conn``, each in a transaction of its own.

    ``wait=True`` (``exai-sessions maintain``): a step another runner is doing is waited for,
    then done (and finds little left to do). ``wait=False`` (a periodic runner in each
    replica): such a step is skipped and named in ``skipped``; one replica works at a time.
    """
    if not isinstance(wait, bool):
        raise TypeError(f"wait must be a bool, got {wait!r}")
    if not conn.autocommit:
        conn.rollback()
        conn.autocommit = True
    try:
        _require_schema(conn)
        results: dict[str, tuple[str, ...]] = {}
        skipped: list[str] = []
        for step, queries in _STEPS:
            rows = _run_step(conn, queries, wait)
            if rows is None:
                skipped.append(step)
            else:
                results[step] = rows
    except psycopg.Error as error:
        raise PersistenceError(f"maintenance failed: {' '.join(str(error).split())}") from error
    return MaintenanceReport(
        partitions_created=results.get(PARTITIONS, ()),
        partitions_dropped=results.get(RETENTION, ()),
        views_refreshed=results.get(VIEWS, ()),
        jobs=results.get(JOBS, ()),
        skipped=tuple(skipped),
    )


def maintain_dsn(dsn: str, *, wait: bool = True) -> MaintenanceReport:
    """Connect to ``dsn``, run :func:`maintain`, disconnect."""
    try:
        conn = psycopg.connect(dsn, autocommit=True)
    except psycopg.Error as error:
        raise PersistenceError(f"cannot connect for maintenance: {' '.join(str(error).split())}") from error
    with conn:
        return maintain(conn, wait=wait)


async def maintain_periodically(
    dsn: str,
    *,
    every_seconds: float,
    on_report: Callable[[MaintenanceReport], object] | None = None,
) -> None:
    """Run :func:`maintain` with ``wait=False`` every ``every_seconds`` until cancelled.

    For an application without pg_cron: start it as a task in each replica. The replicas'
    runs take the same transaction-level lock per step, so one does a step while the others
    skip it. A database error ends the task with ``PersistenceError`` (the task's result).
    """
    if isinstance(every_seconds, bool) or not isinstance(every_seconds, int | float):
        raise TypeError(f"every_seconds must be a number, got {every_seconds!r}")
    if not every_seconds > 0:
        raise ValueError(f"every_seconds must be positive, got {every_seconds!r}")
    while True:
        report = await asyncio.to_thread(maintain_dsn, dsn, wait=False)
        if on_report is not None:
            on_report(report)
        await asyncio.sleep(every_seconds)


def _require_schema(conn: psycopg.Connection) -> None:
    found = conn.execute("SELECT to_regprocedure(%s) IS NOT NULL", (_NEEDED,), prepare=False).fetchone()
    if not found or not found[0]:
        raise PersistenceError(
            f"this database lacks {_NEEDED} (migration 010): apply the migrations first (exai-sessions migrate)"
        )


def _run_step(conn: psycopg.Connection, queries: tuple[str, ...], wait: bool) -> tuple[str, ...] | None:
    # prepare=False throughout: behind a pooler in transaction mode the next transaction may
    # run on a server connection without psycopg's prepared statement.
    with conn.transaction():
        if wait:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,), prepare=False)
        else:
            got = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,), prepare=False).fetchone()
            if not got or not got[0]:
                return None
        for query in queries:
            # bytes: sent as they are, their % signs are format()'s, not parameters
            cursor = conn.execute(query.encode(), prepare=False)
        return tuple(str(row[0]) for row in cursor.fetchall())
