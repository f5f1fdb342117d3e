"""Benchmarks of pytest-exai-sessions, side by side with the baselines, in one run on one machine.

    python benchmarks/run.py            # all, writes benchmarks/RESULTS.md
    python benchmarks/run.py --quick    # fewer repetitions, prints only

Absolute times on a shared 2-core machine are noise; what is compared are ratios measured in
the same run on the same server. Not part of the test suite: speed is measured here, never
asserted in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
from pytest_postgresql.janitor import DatabaseJanitor

from pytest_exai_sessions import SessionManager, SessionStore
from pytest_exai_sessions.crash import CrashHarness
from pytest_exai_sessions.databases import ForcefulJanitor, TestDatabases
from pytest_exai_sessions.schema import apply_to_dsn, latest_version, load_migrations
from pytest_exai_sessions.server import TemporaryPostgres, find_bindir, server_os_user
from pytest_exai_sessions.server.cache import CACHED_PREFIX, ClusterCache

RESULTS = Path(__file__).with_name("RESULTS.md")


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    target: str = ""
    met: bool | None = None

    def line(self) -> str:
        verdict = "" if self.met is None else (": met" if self.met else ": NOT MET")
        return f"| {self.name} | {self.value:.3g} {self.unit} | {self.target}{verdict} |"


def median_ms(action: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


# What pytest-postgresql's postgresql_proc runs with by default: `-F` (fsync off) and
# PostgreSQL's defaults otherwise, undoing the settings this plugin adds for speed.
PYTEST_POSTGRESQL_DEFAULTS = {
    "full_page_writes": "on",
    "wal_level": "replica",
    "max_wal_senders": "10",
    "autovacuum": "on",
}


def start_server(basedir: Path | None, settings: dict[str, str] | None = None) -> TemporaryPostgres:
    return TemporaryPostgres(find_bindir(), basedir=basedir, os_user=server_os_user(None), settings=settings).start()


def janitor(server: TemporaryPostgres, dbname: str, template: str | None = None) -> DatabaseJanitor:
    # pytest-postgresql's own janitor, as its `postgresql` fixture uses it.
    return DatabaseJanitor(
        user=server.user, host=server.host, port=server.port, dbname=dbname, template_dbname=template
    )


def per_test_database(
    tmpfs: TemporaryPostgres, baseline_disk: TemporaryPostgres, baseline_tmpfs: TemporaryPostgres, repeat: int
) -> list[Figure]:
    ours = TestDatabases(tmpfs)
    ours.create_template()
    counter = iter(range(10**6))

    def clone_ours() -> None:
        ours.drop(ours.create_clone())

    def plain_fixture(server: TemporaryPostgres) -> Callable[[], None]:
        # pytest-postgresql's `postgresql` fixture: clone an (empty) template, drop afterwards.
        template = f"plain_tmpl_{secrets.token_hex(3)}"
        janitor(server, template).init()

        def run() -> None:
            database = janitor(server, f"plain_{next(counter)}", template)
            database.init()
            database.drop()

        return run

    def schema_per_test() -> None:
        name = f"fresh_{next(counter)}"
        database = ForcefulJanitor(user=tmpfs.user, host=tmpfs.host, port=tmpfs.port, dbname=name)
        database.init()
        apply_to_dsn(tmpfs.dsn(name))
        database.drop()

    ours_ms = median_ms(clone_ours, repeat)
    plain_disk_ms = median_ms(plain_fixture(baseline_disk), repeat)
    plain_tmpfs_ms = median_ms(plain_fixture(baseline_tmpfs), repeat)
    schema_ms = median_ms(schema_per_test, max(3, repeat // 3))
    ours.drop_template()
    return [
        Figure("fresh database with the schema, per test (tmpfs)", ours_ms, "ms", "<= 15 ms", ours_ms <= 15),
        Figure("pytest-postgresql `postgresql` fixture, its default setup (disk, its settings)", plain_disk_ms, "ms"),
        Figure("pytest-postgresql `postgresql` fixture on tmpfs (its settings)", plain_tmpfs_ms, "ms"),
        Figure("applying the schema per test (tmpfs)", schema_ms, "ms"),
        Figure(
            "ours / pytest-postgresql default", ours_ms / plain_disk_ms, "x", "<= 0.25", ours_ms / plain_disk_ms <= 0.25
        ),
        Figure(
            "ours / pytest-postgresql, same storage",
            ours_ms / plain_tmpfs_ms,
            "x",
            "<= 1.2",
            ours_ms / plain_tmpfs_ms <= 1.2,
        ),
        Figure("ours / schema per test", ours_ms / schema_ms, "x", "<= 0.4", ours_ms / schema_ms <= 0.4),
    ]


def cold_start(basedir: Path | None, repeat: int) -> list[Figure]:
    def start_to_template() -> None:
        server = start_server(basedir)
        try:
            TestDatabases(server).create_template()
        finally:
            server.stop()

    cold_ms = median_ms(start_to_template, repeat)

    cache_dir = Path(tempfile.mkdtemp(prefix="exai-bench-cache-", dir=basedir or "/dev/shm"))
    os.chmod(cache_dir, 0o755)  # our own directory: the server's OS user must enter it
    bindir, os_user = find_bindir(), server_os_user(None)

    def make_server() -> TemporaryPostgres:
        return TemporaryPostgres(bindir, basedir=cache_dir, os_user=os_user)

    def build(server: TemporaryPostgres) -> None:
        TestDatabases(server, prefix=CACHED_PREFIX).create_template()

    cache = ClusterCache(cache_dir, load_migrations())
    cache.start(make_server, build).stop()  # the first run builds the cache

    def warm_start() -> None:
        cache.start(make_server, build).stop()

    try:
        warm_ms = median_ms(warm_start, repeat)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return [
        Figure("cold start to first test ready (initdb, start, template)", cold_ms, "ms", "<= 600 ms", cold_ms <= 600),
        Figure("warm start from the cached cluster (--exai-reuse)", warm_ms, "ms"),
        Figure("warm / cold", warm_ms / cold_ms, "x", "<= 0.35", warm_ms / cold_ms <= 0.35),
    ]


async def manager_speed(server: TemporaryPostgres, repeat: int) -> list[Figure]:
    databases = TestDatabases(server)
    databases.create_template()
    dsn = server.dsn(databases.create_clone())
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for number in range(100):
                await conn.execute("INSERT INTO public.sessions (session_id) VALUES (%s)", (f"raw-{number}",))
            started = time.perf_counter()
            for number in range(repeat):
                await conn.execute(
                    "UPDATE public.sessions SET request_count = request_count + 1,"
                    " total_duration_ms = total_duration_ms + %s, last_activity_at = now() WHERE session_id = %s",
                    (5, f"raw-{number % 100}"),
                )
            raw_rate = repeat / (time.perf_counter() - started)

            batch = 10_000
            started = time.perf_counter()
            async with conn.transaction():
                await conn.execute(
                    "CREATE TEMP TABLE batch (session_id text, requests int, duration_ms int) ON COMMIT DROP"
                )
                async with conn.cursor().copy("COPY batch FROM STDIN") as copy:
                    for number in range(batch):
                        await copy.write_row((f"raw-{number % 100}", 1, 5))
                await conn.execute(
                    "UPDATE public.sessions s SET request_count = s.request_count + b.n,"
                    " total_duration_ms = s.total_duration_ms + b.d, last_activity_at = now()"
                    " FROM (SELECT session_id, sum(requests) n, sum(duration_ms) d FROM batch GROUP BY 1) b"
                    " WHERE s.session_id = b.session_id"
                )
            raw_batch_rate = batch / (time.perf_counter() - started)

        store = await SessionStore.open(dsn)
        async with SessionManager(store, close_store=True, max_concurrent_sessions=10_000) as manager:
            for number in range(100):
                await manager.ensure(f"m-{number}")
            started = time.perf_counter()
            for number in range(repeat):
                await manager.update_activity(f"m-{number % 100}", 5)
            manager_rate = repeat / (time.perf_counter() - started)
            started = time.perf_counter()
            await manager.update_activity_many([(f"m-{number % 100}", 5) for number in range(batch)])
            batch_rate = batch / (time.perf_counter() - started)
    finally:
        databases.drop_template()
    return [
        Figure("raw psycopg single-statement update", raw_rate, "/s"),
        Figure("SessionManager.update_activity", manager_rate, "/s"),
        Figure("update_activity / raw", manager_rate / raw_rate, "x", ">= 0.7", manager_rate / raw_rate >= 0.7),
        Figure("raw COPY + merge", raw_batch_rate, "requests/s"),
        Figure("update_activity_many", batch_rate, "requests/s"),
        Figure(
            "batch API / raw COPY + merge",
            batch_rate / raw_batch_rate,
            "x",
            ">= 0.5",
            batch_rate / raw_batch_rate >= 0.5,
        ),
    ]


async def recovery(server: TemporaryPostgres, count: int) -> list[Figure]:
    databases = TestDatabases(server)
    databases.create_template()
    dsn = server.dsn(databases.create_clone())
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO public.sessions (session_id, user_id, session_data, metadata, request_count, ip_address)"
                " SELECT 's' || n, 'u' || (n %% 97), jsonb_build_object('n', n, 'tags', jsonb_build_array('a', n)),"
                " '{\"v\": 1}', n %% 50, '10.0.0.1' FROM generate_series(1, %s) AS n",
                (count,),
            )
        started = time.perf_counter()
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT * FROM public.sessions").fetchall()
        raw_rate = len(rows) / (time.perf_counter() - started)
        store = await SessionStore.open(dsn)
        manager = SessionManager(store, close_store=True, cleanup_interval_secs=0)
        started = time.perf_counter()
        recovered = await manager.recover_all_sessions()
        manager_rate = recovered / (time.perf_counter() - started)
        await manager.aclose()
    finally:
        databases.drop_template()
    assert recovered == count, (recovered, count)
    return [
        Figure(f"raw SELECT of {count} sessions", raw_rate, "rows/s"),
        Figure(f"recover_all_sessions of {count}", manager_rate, "sessions/s"),
        Figure("recovery / raw SELECT", manager_rate / raw_rate, "x", ">= 0.5", manager_rate / raw_rate >= 0.5),
    ]


async def kill_and_restart(server: TemporaryPostgres, repeat: int) -> list[Figure]:
    harness = CrashHarness(server.dsn(), server)
    seconds = statistics.median(harness.crash_database() for _ in range(repeat))
    return [
        Figure("database SIGKILL to accepting connections again", seconds * 1000, "ms", "<= 500 ms", seconds <= 0.5)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions; print, do not write RESULTS.md")
    args = parser.parse_args()
    repeat = 5 if args.quick else 30
    disk = Path(tempfile.mkdtemp(prefix="exai-bench-", dir="/var/tmp"))
    os.chmod(disk, 0o755)  # our own directory: the server's OS user must enter it
    tmpfs_server = start_server(None)
    disk_server = start_server(disk, PYTEST_POSTGRESQL_DEFAULTS)
    baseline_tmpfs = start_server(None, PYTEST_POSTGRESQL_DEFAULTS)
    sections: list[tuple[str, list[Figure]]] = []
    try:
        sections.append(
            ("1. A fresh database per test", per_test_database(tmpfs_server, disk_server, baseline_tmpfs, repeat))
        )
        sections.append(("2. Cold start", cold_start(None, max(3, repeat // 6))))
        sections.append(("3. Manager speed", asyncio.run(manager_speed(tmpfs_server, 200 * repeat))))
        sections.append(("4. Recovery", asyncio.run(recovery(tmpfs_server, 20_000 if args.quick else 100_000))))
        sections.append(
            ("5. Database kill and restart", asyncio.run(kill_and_restart(tmpfs_server, max(3, repeat // 6))))
        )
    finally:
        tmpfs_server.stop()
        disk_server.stop()
        baseline_tmpfs.stop()
        disk.rmdir()
    header = (
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; PostgreSQL {tmpfs_server.version}; schema version {latest_version()}; "
        f"cluster on tmpfs (/dev/shm) unless stated. Medians of {repeat} runs where repeated."
    )
    lines = [header, ""]
    for title, figures in sections:
        lines += [f"### {title}", "", "| measure | value | target |", "|---|---|---|", *(f.line() for f in figures), ""]
    report = "\n".join(lines)
    print(report)
    if not args.quick:
        RESULTS.write_text(
            f"# Benchmark results\n\nWritten by `python benchmarks/run.py` on {time.strftime('%Y-%m-%d')}.\n\n{report}"
        )


if __name__ == "__main__":
    main()
