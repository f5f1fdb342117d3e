"""Benchmarks of pytest-exai-sessions, side by side with the baselines, in one run on one machine.

    python benchmarks/run.py            # all, writes benchmarks/RESULTS.md
    python benchmarks/run.py --quick    # fewer repetitions, prints only
    python benchmarks/run.py --only 3 6 # only those sections, prints only
    python benchmarks/run.py --only 9 --write  # that section measured again, in place in RESULTS.md

Absolute times on a shared 2-core machine are noise; what is compared are ratios measured in
the same run on the same server. Not part of the test suite: speed is measured here, never
asserted in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import re
import statistics
import subprocess
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import first_test as first_test_bench
import per_test
import psycopg
from psycopg import sql

from pytest_exai_sessions import Session, SessionManager, SessionStore
from pytest_exai_sessions.schema import latest_version
from pytest_exai_sessions.server import TemporaryPostgres, find_bindir, server_os_user
from pytest_exai_sessions.server.pooler import POOL_MODES, PgBouncer, PoolerNotFound, find_pgbouncer
from pytest_exai_sessions.store import COLUMNS
from pytest_exai_sessions.testing.crash import CrashHarness
from pytest_exai_sessions.testing.databases import TestDatabases

RESULTS = Path(__file__).with_name("RESULTS.md")
METHOD = """How: 1. Each fixture hands a connection to a database of its own to 40 identical tests in a \
pytest subprocess; the per-test cost is the setup plus teardown time pytest reports, median of 3 \
interleaved runs. Ours clones ahead in the background (`--exai-clones-ahead`, default 2), so a test \
waits only for what is not ready; "clone + drop called directly" is the work one clone is. \
pytest-postgresql's `postgresql` fixture runs on a server this script starts with its settings \
(fsync off only), as its own `postgresql_proc` refuses to run as root. 2. A fresh `pytest -q` process \
per measurement on a one-test file whose test asks for a connection (ours: `exai_dsn`; pytest-postgresql: its \
`postgresql` fixture with its `postgresql_proc`), in a virtualenv of the system Python readable by the \
unprivileged user `postgres`; pytest-postgresql runs only as that user (it runs `pg_ctl initdb` itself, which \
refuses root). The first-test setup is the setup duration pytest reports for the test (what `--durations` \
shows, session fixtures included); the whole process is its wall time. Each run disables the other \
project's plugin. One untimed run of each variant, then the variants take turns in each round; a ratio is \
the median of the per-round ratios. Cold: the cache directory is emptied before each run; warm: a cache \
directory of its own, filled by the untimed run. Phases are the plugin's summary (ours runs `-q -vv`: \
net `-v`). 3. 30 alternating blocks of \
200 calls; a ratio is the median of the per-block ratios. The target's baseline is the raw upsert, \
as the issue states; the plain UPDATE is shown as a stricter one. A get is compared with a raw \
psycopg `SELECT` of the same columns by `session_id` on one autocommit connection (the raw \
baselines' setup): once plainly, once with a second manager (another replica) counting a request \
of the session before each read (untimed; only the reads are), every read checked to return that \
change. 4. 3 alternating rounds; every field of every recovered session is checked; the table is \
filled by one INSERT ... SELECT generate_series, then VACUUM ANALYZE. 6. Two databases filled so, \
1,000 and 1,000,000 sessions; `SessionManager.open(dsn)` (default options) plus a `get` of a \
random stored id (its fields checked), the two sizes alternating for 15 rounds after one untimed \
round each; memory is the tracemalloc peak, in rounds of their own, and the largest growth \
of this process's RSS over open + get, the manager still open; a ratio is the median of the per-round ratios. \
7. {pgbouncer} (`pgbouncer --version`) in front of the same tmpfs server, one in transaction and one in session \
pool mode, each on a unix socket of its own. On one cloned database, section 3's raw upsert and SELECT (one \
autocommit connection per path; through a pooler with `prepare_threshold=None`) and `update_activity` and `get` \
(default store options), direct and through each pooler, and a direct manager with `"prepared_statements": False`, \
all take turns in the same 30 alternating blocks of 200 calls on the same 100 sessions; a ratio is the median of the \
per-block ratios. 9. A server with production durability (fsync, full_page_writes and synchronous_commit on, \
wal_level replica) whose data directory lies on an ext4 image loop-mounted from /dev/shm (`PowerLossPostgres`). A \
power cut freezes the server, shuts the filesystem down with ext4's shutdown ioctl without flushing its journal \
(what was not fsynced is lost) and kills every process of the server; power on mounts the image again (the journal \
replays) and starts PostgreSQL, which runs crash recovery. Recovery: {cuts} rounds on one database, each a power cut \
and a SIGKILL of the postmaster and its children (`kill()` + `restart()`) in turn, each after 0.3 s of `ensure` + \
`update_activity` on 100 sessions by a new `SessionManager`; the time runs from the cut (the server already frozen) \
or the signal until the postmaster says it accepts connections; the WAL is what lies past the last checkpoint's redo \
point at the fault (`pg_control_checkpoint()`). update_activity: section 3's call on 100 sessions of a clone on each \
server, {blocks} alternating blocks of 200 calls; a ratio is the median of the per-block ratios. Acknowledged \
inserts lost: per setting (over production's) and fault, {trials} trials in a row on a server of their own (a fresh \
one after one that did not start again). A trial creates a database with a table `acked (n int PRIMARY KEY)`, runs \
CHECKPOINT and a syncfs of the disk, then one autocommit psycopg connection inserts rows 1, 2, ... one per statement \
for 2 s, a row acknowledged once its execute returned; the fault comes while the client waits for an answer (the \
event loop stands still until the server is back), then the rows are counted. Lost: acknowledged rows missing (all \
of them when the table is gone or the server does not start); the row in flight may be there, its outcome unknown, \
and counts neither way. 10. Two `ReplicatedCluster`s of a primary and one streaming standby (synchronous `FIRST \
1`, and asynchronous) and a single node, all `ClusterNode`s on tmpfs with the cluster's settings (wal_level \
replica, full_page_writes and wal_log_hints on, fsync off) started from one seed data directory with the \
template and a clone; a `SessionManager` (default store options) on the clone through the cluster's DSN (every \
node, `target_session_attrs=read-write`). Failover: {failover_rounds} rounds per cluster; the manager calls \
`update_activity` on 100 sessions back to back on the event loop (5 ms pause after a failed call, as \
`first_write()` pauses between attempts); after 0.3 s `kill_primary()` (SIGKILL) and `promote()` run in threads \
(`asyncio.to_thread`), `first_write()` (a fresh connection committing through the same DSN) in another thread at \
the same time; the time runs from `killed_at` to the end of the first call begun after the kill (the server \
reaped) that the store acknowledges (a call that raised `PersistenceError` or `CommitUncertain` does not count), \
then `rejoin()` (pg_rewind) for the next round, the same manager throughout. Single server: the same with \
`KillDatabase` (SIGKILL, then `restart()`) on the single node and the same polling loop as `first_write()` on \
its DSN. update_activity: the four servers' managers in {failover_blocks} alternating blocks of 200 calls on 100 \
sessions, before any failover; a ratio is the median of the per-block ratios."""
# Section 8 is claims.py's: this script keeps it as it is.
OWN_SECTIONS = (1, 2, 3, 4, 5, 6, 7, 9, 10)
# Section 9's repetitions, by --quick.
POWER_LOSS_RUNS = {False: {"cuts": 20, "blocks": 30, "trials": 5}, True: {"cuts": 5, "blocks": 5, "trials": 3}}
# Section 10's repetitions, by --quick.
FAILOVER_RUNS = {False: {"rounds": 10, "blocks": 30}, True: {"rounds": 3, "blocks": 5}}


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    target: str = ""
    met: bool | None = None

    def line(self) -> str:
        verdict = "" if self.met is None else (": met" if self.met else ": NOT MET")
        value = f"{self.value:,}" if isinstance(self.value, int) else f"{self.value:.3g}"
        return f"| {self.name} | {value} {self.unit} | {self.target}{verdict} |"


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


def per_test_database(
    tmpfs: TemporaryPostgres, baseline_disk: TemporaryPostgres, baseline_tmpfs: TemporaryPostgres, quick: bool
) -> list[Figure]:
    fixtures = {
        "ours": (per_test.OURS, []),
        "ours, cloned in the test": (per_test.OURS, ["--exai-clones-ahead=0"]),
        "pytest-postgresql, disk": (per_test.pytest_postgresql_fixture(baseline_disk), []),
        "pytest-postgresql, tmpfs": (per_test.pytest_postgresql_fixture(baseline_tmpfs), []),
        "schema per test": (per_test.SCHEMA_PER_TEST, []),
    }
    measured = per_test.compare(fixtures, tests=15 if quick else 40, rounds=1 if quick else 3)
    figures = [direct_clone(tmpfs, 5 if quick else 30)]
    for body, by_fixture in measured.items():
        ours = by_fixture["ours"].cost_ms
        disk = by_fixture["pytest-postgresql, disk"].cost_ms
        same_storage = by_fixture["pytest-postgresql, tmpfs"].cost_ms
        schema = by_fixture["schema per test"].cost_ms
        figures += [
            Figure(
                f"{body} ({by_fixture['ours'].body_ms:.3g} ms): fresh database, per test (tmpfs)",
                ours,
                "ms",
                "<= 15 ms",
                ours <= 15,
            ),
            Figure(f"{body}: ours with --exai-clones-ahead=0", by_fixture["ours, cloned in the test"].cost_ms, "ms"),
            Figure(f"{body}: pytest-postgresql `postgresql`, its default setup (disk, its settings)", disk, "ms"),
            Figure(f"{body}: pytest-postgresql `postgresql` on tmpfs (its settings)", same_storage, "ms"),
            Figure(f"{body}: applying the schema per test (tmpfs)", schema, "ms"),
            Figure(f"{body}: ours / pytest-postgresql default", ours / disk, "x", "<= 0.25", ours / disk <= 0.25),
            Figure(
                f"{body}: ours / pytest-postgresql, same storage",
                ours / same_storage,
                "x",
                "<= 1.2",
                ours / same_storage <= 1.2,
            ),
            Figure(f"{body}: ours / schema per test", ours / schema, "x", "<= 0.4", ours / schema <= 0.4),
        ]
    return figures


def direct_clone(server: TemporaryPostgres, repeat: int) -> Figure:
    """The work a clone is: CREATE DATABASE from the template and its DROP, called one after the other."""
    databases = TestDatabases(server)
    databases.create_template()
    try:
        ms = median_ms(lambda: databases.drop(databases.create_clone()), repeat)
    finally:
        databases.drop_template()
    return Figure("clone + drop called directly, no test around them (tmpfs)", ms, "ms")


def first_test(rounds: int) -> list[Figure]:
    """The first test's setup and the whole ``pytest`` process, ours against pytest-postgresql's (first_test.py)."""
    environment, variants = first_test_bench.measure(rounds)
    pp_disk = variants["pytest-postgresql (unprivileged, its default: data directory under /tmp, on disk)"]
    pp_tmpfs = variants["pytest-postgresql (unprivileged, --basetemp on tmpfs)"]

    def ratio(ours: first_test_bench.Variant, theirs: first_test_bench.Variant) -> float:
        return statistics.median(a / b for a, b in zip(ours.setups, theirs.setups, strict=True))

    figures = [Figure(f"environment: {environment}", rounds, "rounds")]
    figures += [
        Figure(f"first-test setup: {name}", statistics.median(v.setups) * 1000, "ms") for name, v in variants.items()
    ]
    targets = {"warm": ("<= 0.2", 0.2), "cold": ("<= 0.75", 0.75)}
    for name, variant in variants.items():
        if not name.startswith("ours, cache warm") and not name.startswith("ours, cache cold"):
            continue
        text, limit = targets["warm" if "warm" in name else "cold"]
        for label, theirs in (("its default", pp_disk), ("on tmpfs", pp_tmpfs)):
            value = ratio(variant, theirs)
            figures.append(
                Figure(
                    f"{name} / pytest-postgresql ({label})",
                    value,
                    "x",
                    text,
                    value <= limit if label == "its default" else None,
                )
            )
    warm = variants["ours, cache warm (unprivileged)"]
    figures += [
        Figure(f"whole `pytest -q` process: {name}", statistics.median(variant.walls) * 1000, "ms")
        for name, variant in variants.items()
        if variant in (warm, pp_disk, pp_tmpfs)
    ]
    figures.append(
        Figure(
            "whole process, ours (cache warm) / pytest-postgresql (its default)",
            statistics.median(a / b for a, b in zip(warm.walls, pp_disk.walls, strict=True)),
            "x",
        )
    )
    for name, variant in variants.items():
        for phase, ms, detail in first_test_bench.median_phases(variant.phases):
            figures.append(Figure(f"{name}: {phase}" + (f" ({detail})" if detail else ""), ms, "ms"))
    return figures


RAW_UPSERT = (
    "INSERT INTO public.sessions (session_id, request_count, total_duration_ms) VALUES (%s, 1, %s)"
    " ON CONFLICT (session_id) DO UPDATE SET request_count = sessions.request_count + 1,"
    " total_duration_ms = sessions.total_duration_ms + excluded.total_duration_ms, last_activity_at = now()"
)
RAW_UPDATE = (
    "UPDATE public.sessions SET request_count = request_count + 1,"
    " total_duration_ms = total_duration_ms + %s, last_activity_at = now() WHERE session_id = %s"
)
# The columns a get returns (host() as the store reads ip_address), by primary key, nothing else:
# no liveness test, no model. Rendered to a string once, as a hand-written query would be.
RAW_SELECT = sql.SQL("SELECT {columns} FROM {table} WHERE {key} = %s").format(
    columns=sql.SQL(", ").join(
        sql.SQL("host({})").format(sql.Identifier(column)) if field == "ip_address" else sql.Identifier(column)
        for field, column in COLUMNS.items()
    ),
    table=sql.Identifier("public", "sessions"),
    key=sql.Identifier("session_id"),
)


def single_calls(
    conn: psycopg.AsyncConnection[Any], manager: SessionManager
) -> dict[str, Callable[[int], Awaitable[None]]]:
    """Call number ``n`` of each way: raw psycopg on ``conn``, the API on ``manager``, on 100 sessions."""

    async def upsert(number: int) -> None:
        await conn.execute(RAW_UPSERT, (f"raw-{number % 100}", 5))

    async def update(number: int) -> None:
        await conn.execute(RAW_UPDATE, (5, f"raw-{number % 100}"))

    async def update_activity(number: int) -> None:
        await manager.update_activity(f"m-{number % 100}", 5)

    async def raw_select(number: int) -> None:
        cur = await conn.execute(select, (f"m-{number % 100}",))
        await cur.fetchone()

    async def get(number: int) -> None:
        await manager.get(f"m-{number % 100}")

    select = RAW_SELECT.as_string(conn)
    return {
        "upsert": upsert,
        "update": update,
        "update_activity": update_activity,
        "raw_select": raw_select,
        "get": get,
    }


async def per_call_rates(
    ways: dict[str, Callable[[int], Awaitable[None]]], blocks: int, calls: int
) -> dict[str, list[float]]:
    """Calls per second of each way, in alternating blocks of ``calls`` calls."""

    def block(call: Callable[[int], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            for number in range(calls):
                await call(number)

        return run

    return await alternating_rates({name: block(call) for name, call in ways.items()}, blocks, calls)


async def changed_read_rates(
    conn: psycopg.AsyncConnection[Any], manager: SessionManager, replica: SessionManager, blocks: int, calls: int
) -> dict[str, list[float]]:
    """Reads per second of a session another replica has just changed: the read alone is timed.

    Before each read ``replica`` counts a request of the session (untimed), so every read is
    of a row changed since this manager last saw it; each read must return that change.
    """

    async def raw_select(session_id: str) -> int:
        cur = await conn.execute(select, (session_id,))
        row = await cur.fetchone()
        assert row is not None
        return int(row[list(COLUMNS).index("request_count")])

    async def get(session_id: str) -> int:
        session = await manager.get(session_id)
        assert session is not None
        return session.request_count

    select = RAW_SELECT.as_string(conn)
    ways: dict[str, Callable[[str], Awaitable[int]]] = {"raw_select": raw_select, "get": get}
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(blocks):
        for name, read in ways.items():
            elapsed = 0.0
            for number in range(calls):
                session_id = f"m-{number % 100}"
                changed = await replica.update_activity(session_id, 5)
                started = time.perf_counter()
                seen = await read(session_id)
                elapsed += time.perf_counter() - started
                if seen != changed.request_count:
                    raise AssertionError(f"{name} read request_count {seen}, the replica wrote {changed.request_count}")
            rates[name].append(calls / elapsed)
    return rates


async def batch_request_rates(
    conn: psycopg.AsyncConnection[Any], manager: SessionManager, rounds: int, batch: int
) -> dict[str, list[float]]:
    """Requests per second counted in batches: raw COPY into a temp table and one merge, then the API."""

    async def copy_and_merge() -> None:
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

    async def update_activity_many() -> None:
        await manager.update_activity_many([(f"m-{number % 100}", 5) for number in range(batch)])

    return await alternating_rates({"copy": copy_and_merge, "many": update_activity_many}, rounds, batch)


async def alternating_rates(
    ways: dict[str, Callable[[], Awaitable[None]]], rounds: int, per_run: int
) -> dict[str, list[float]]:
    """``per_run`` / seconds of each way's run, the ways taking turns: a load change hits all alike."""
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, run in ways.items():
            started = time.perf_counter()
            await run()
            rates[name].append(per_run / (time.perf_counter() - started))
    return rates


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


async def manager_speed(server: TemporaryPostgres, blocks: int) -> list[Figure]:
    databases = TestDatabases(server)
    databases.create_template()
    dsn = server.dsn(databases.create_clone())
    try:
        store = await SessionStore.open(dsn)
        async with (
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
            SessionManager(store, close_store=True, max_concurrent_sessions=10_000) as manager,
            # A second replica on the same database, to change sessions between this one's reads.
            SessionManager.connect(dsn, max_concurrent_sessions=10_000, cleanup_interval_secs=0) as replica,
        ):
            for number in range(100):
                await conn.execute("INSERT INTO public.sessions (session_id) VALUES (%s)", (f"raw-{number}",))
                await manager.ensure(f"m-{number}")
            rates = await per_call_rates(single_calls(conn, manager), blocks, calls=200)
            changed_rates = await changed_read_rates(conn, manager, replica, blocks, calls=200)
            batch_rates = await batch_request_rates(conn, manager, rounds=max(3, blocks // 3), batch=10_000)
    finally:
        databases.drop_template()
    to_upsert = median_ratio(rates["update_activity"], rates["upsert"])
    to_update = median_ratio(rates["update_activity"], rates["update"])
    to_copy = median_ratio(batch_rates["many"], batch_rates["copy"])
    get_to_select = median_ratio(rates["get"], rates["raw_select"])
    changed_to_select = median_ratio(changed_rates["get"], changed_rates["raw_select"])
    return [
        Figure(
            "raw psycopg single-statement upsert (INSERT ... ON CONFLICT DO UPDATE)",
            statistics.median(rates["upsert"]),
            "/s",
        ),
        Figure("raw psycopg single-statement UPDATE", statistics.median(rates["update"]), "/s"),
        Figure(
            "SessionManager.update_activity (returns the stored row)", statistics.median(rates["update_activity"]), "/s"
        ),
        Figure("update_activity / raw upsert", to_upsert, "x", ">= 0.7", to_upsert >= 0.7),
        Figure("update_activity / raw UPDATE (stricter than the target)", to_update, "x"),
        Figure("raw psycopg primary-key SELECT of the same columns", statistics.median(rates["raw_select"]), "/s"),
        Figure("SessionManager.get (always reads the database)", statistics.median(rates["get"]), "/s"),
        Figure("get / raw SELECT", get_to_select, "x", ">= 0.7", get_to_select >= 0.7),
        Figure(
            "raw SELECT of a session another replica just changed",
            statistics.median(changed_rates["raw_select"]),
            "/s",
        ),
        Figure(
            "get of a session another replica just changed (sees the change)",
            statistics.median(changed_rates["get"]),
            "/s",
        ),
        Figure(
            "get / raw SELECT, after another replica's change",
            changed_to_select,
            "x",
            ">= 0.7",
            changed_to_select >= 0.7,
        ),
        Figure("raw COPY + merge", statistics.median(batch_rates["copy"]), "requests/s"),
        Figure("update_activity_many", statistics.median(batch_rates["many"]), "requests/s"),
        Figure("batch API / raw COPY + merge", to_copy, "x", ">= 0.5", to_copy >= 0.5),
    ]


def recovered_as_inserted(sessions: dict[str, Session], n: int) -> bool:
    """Every field of session ``s<n>`` as the INSERT below wrote it, with defaults elsewhere."""
    session = sessions.get(f"s{n}")
    return session is not None and (
        session.user_id,
        session.data,
        session.metadata,
        session.request_count,
        session.ip_address,
        session.total_duration_ms,
        session.state.value,
        session.user_type.value,
        session.user_agent,
        session.expires_at,
        session.version,
    ) == (
        f"u{n % 97}",
        {"n": n, "tags": ["a", n]},
        {"v": 1},
        n % 50,
        "10.0.0.1",
        0,
        "active",
        "human",
        None,
        None,
        1,
    )


def fill_sessions(dsn: str, count: int) -> None:
    """``count`` live sessions s1..s<count> in one INSERT ... SELECT, then VACUUM ANALYZE (as a served table is)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO public.sessions (session_id, user_id, session_data, metadata, request_count, ip_address)"
            " SELECT 's' || n, 'u' || (n %% 97), jsonb_build_object('n', n, 'tags', jsonb_build_array('a', n)),"
            " '{\"v\": 1}', n %% 50, '10.0.0.1' FROM generate_series(1, %s) AS n",
            (count,),
        )
        conn.execute("VACUUM ANALYZE public.sessions")


async def recovery(server: TemporaryPostgres, count: int, rounds: int) -> list[Figure]:
    databases = TestDatabases(server)
    databases.create_template()
    dsn = server.dsn(databases.create_clone())
    try:
        fill_sessions(dsn, count)
        raw_rates: list[float] = []
        manager_rates: list[float] = []
        for _ in range(rounds):  # alternating, so a load change hits both alike
            started = time.perf_counter()
            with psycopg.connect(dsn) as conn:
                rows = conn.execute("SELECT * FROM public.sessions").fetchall()
            raw_rates.append(len(rows) / (time.perf_counter() - started))
            store = await SessionStore.open(dsn)
            manager = SessionManager(store, close_store=True, cleanup_interval_secs=0)
            started = time.perf_counter()
            recovered = await manager.recover_all_sessions()
            manager_rates.append(len(recovered) / (time.perf_counter() - started))
            mismatched = [n for n in range(1, count + 1) if not recovered_as_inserted(recovered, n)]
            await manager.aclose()
            if len(recovered) != count or mismatched:
                raise AssertionError(f"recovered {len(recovered)} of {count}; fields differ in {mismatched[:5]}...")
            del recovered  # 100k sessions: not kept into the next round
    finally:
        databases.drop_template()
    ratio = median_ratio(manager_rates, raw_rates)
    return [
        Figure(f"raw SELECT of {count} sessions", statistics.median(raw_rates), "rows/s"),
        Figure(f"recover_all_sessions of {count}", statistics.median(manager_rates), "sessions/s"),
        Figure("recovery / raw SELECT", ratio, "x", ">= 0.5", ratio >= 0.5),
        Figure("sessions recovered with every field as inserted", count, "sessions"),
    ]


def rss_kib() -> int:
    """This process's resident set now (/proc/self/statm, in pages)."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024


async def start_and_first_get(dsn: str, session_id: str, *, traced: bool) -> tuple[float, float, float]:
    """Seconds, RSS growth (KiB) and, if ``traced``, tracemalloc peak (KiB) of ``open`` + one ``get``.

    The manager stays open until all is measured: what it holds while serving counts.
    """
    if traced:
        tracemalloc.start()
    rss_before = rss_kib()
    started = time.perf_counter()
    manager = await SessionManager.open(dsn)  # the options a replica starts with by default
    try:
        session = await manager.get(session_id)
        seconds = time.perf_counter() - started
        rss_growth = rss_kib() - rss_before
        peak = tracemalloc.get_traced_memory()[1] / 1024 if traced else 0.0
    finally:
        if traced:
            tracemalloc.stop()
        await manager.aclose()
    number = int(session_id[1:])
    if session is None or not recovered_as_inserted({session_id: session}, number):
        raise AssertionError(f"get({session_id!r}) returned {session!r}")
    return seconds, rss_growth, peak


async def start_over_table_sizes(server: TemporaryPostgres, sizes: tuple[int, int], rounds: int) -> list[Figure]:
    """``open`` + first ``get`` of a random stored id, on a small and on a large table, in alternation."""
    databases = TestDatabases(server)
    databases.create_template()
    try:
        dsns = {}
        for size in sizes:
            dsns[size] = server.dsn(databases.create_clone())
            fill_sessions(dsns[size], size)
        pick = random.Random(9)  # the same ids every run
        for size in sizes:  # once untimed each: first-use costs of the process (imports, adapters) are not the table's
            await start_and_first_get(dsns[size], f"s{pick.randint(1, size)}", traced=False)
        seconds: dict[int, list[float]] = {size: [] for size in sizes}
        rss: dict[int, list[float]] = {size: [] for size in sizes}
        peaks: dict[int, list[float]] = {size: [] for size in sizes}
        for _ in range(rounds):
            for size in sizes:
                took, grew, _ = await start_and_first_get(dsns[size], f"s{pick.randint(1, size)}", traced=False)
                seconds[size].append(took)
                rss[size].append(grew)
            # tracemalloc slows every allocation: its rounds are not the timed ones.
            for size in sizes:
                _, _, peak = await start_and_first_get(dsns[size], f"s{pick.randint(1, size)}", traced=True)
                peaks[size].append(peak)
    finally:
        databases.drop_template()
    small, large = sizes
    time_ratio = median_ratio(seconds[large], seconds[small])
    peak_ratio = median_ratio(peaks[large], peaks[small])
    figures = []
    for size in sizes:
        figures += [
            Figure(f"open + first get, {size:,} stored sessions", statistics.median(seconds[size]) * 1000, "ms"),
            Figure(f"Python memory peak (tracemalloc) of open + get, {size:,}", statistics.median(peaks[size]), "KiB"),
            Figure(f"largest RSS growth of open + get over the rounds, {size:,}", max(rss[size]), "KiB"),
        ]
    return [
        *figures,
        Figure(f"open + get time, {large:,} / {small:,}", time_ratio, "x", "<= 1.5", time_ratio <= 1.5),
        Figure(f"open + get memory peak, {large:,} / {small:,}", peak_ratio, "x", "<= 1.5", peak_ratio <= 1.5),
    ]


async def kill_and_restart(server: TemporaryPostgres, repeat: int) -> list[Figure]:
    harness = CrashHarness(server.dsn(), server)
    seconds = statistics.median(harness.crash_database() for _ in range(repeat))
    return [
        Figure("database SIGKILL to accepting connections again", seconds * 1000, "ms", "<= 500 ms", seconds <= 0.5)
    ]


def pgbouncer_version() -> str:
    """The first line of ``pgbouncer --version`` ("PgBouncer 1.18.0"), or why there is none."""
    try:
        found = subprocess.run([str(find_pgbouncer()), "--version"], capture_output=True, text=True, check=True)
    except (PoolerNotFound, OSError, subprocess.CalledProcessError) as error:
        return f"no PgBouncer ({error})"
    return found.stdout.splitlines()[0].strip()


# The calls section 7 compares on every path, and how each is named in its figures.
POOLED_CALLS = {
    "upsert": "raw psycopg upsert",
    "update_activity": "SessionManager.update_activity",
    "raw_select": "raw psycopg primary-key SELECT",
    "get": "SessionManager.get",
}


async def behind_pgbouncer(server: TemporaryPostgres, blocks: int) -> list[Figure]:
    """Section 3's calls directly and through PgBouncer in each pool mode, and the store never preparing.

    Every way takes its turn in the same alternation, on the same database and sessions.
    """
    databases = TestDatabases(server)
    databases.create_template()
    dbname = databases.create_clone()
    poolers = {mode: PgBouncer(server, mode=mode, os_user=server_os_user(None)) for mode in POOL_MODES}
    try:
        for pooler in poolers.values():
            pooler.start()
        dsns: dict[str, str] = {"direct": server.dsn(dbname)}
        dsns |= {mode: pooler.dsn(dbname) for mode, pooler in poolers.items()}
        async with contextlib.AsyncExitStack() as stack:
            ways: dict[str, Callable[[int], Awaitable[None]]] = {}
            direct_conn: psycopg.AsyncConnection[Any] | None = None
            for path, dsn in dsns.items():
                # Through a transaction pooler raw psycopg must not prepare: the next statement may
                # run on another server connection (PgBouncer before 1.21 tracks no prepared
                # statement). Session mode is set alike, so that the two modes differ in the mode only.
                prepare = {} if path == "direct" else {"prepare_threshold": None}
                conn = await stack.enter_async_context(
                    await psycopg.AsyncConnection.connect(dsn, autocommit=True, **prepare)
                )
                manager = await stack.enter_async_context(
                    SessionManager.connect(dsn, max_concurrent_sessions=10_000, cleanup_interval_secs=0)
                )
                if path == "direct":
                    direct_conn = conn
                    for number in range(100):
                        await conn.execute("INSERT INTO public.sessions (session_id) VALUES (%s)", (f"raw-{number}",))
                        await manager.ensure(f"m-{number}")
                calls = single_calls(conn, manager)
                ways |= {f"{path} {name}": calls[name] for name in POOLED_CALLS}
            assert direct_conn is not None
            # What the store does behind a transaction pooler, here on a direct connection.
            unprepared = await stack.enter_async_context(
                SessionManager.connect(
                    dsns["direct"],
                    store_options={"prepared_statements": False},
                    max_concurrent_sessions=10_000,
                    cleanup_interval_secs=0,
                )
            )
            calls = single_calls(direct_conn, unprepared)
            ways |= {f"unprepared {name}": calls[name] for name in ("update_activity", "get")}
            rates = await per_call_rates(ways, blocks, calls=200)
    finally:
        for pooler in poolers.values():
            pooler.stop()
        databases.drop_template()

    def rate(path: str, name: str) -> float:
        return statistics.median(rates[f"{path} {name}"])

    def ratio(numerator: str, denominator: str) -> float:
        return median_ratio(rates[numerator], rates[denominator])

    figures = []
    for path in dsns:
        where = "direct" if path == "direct" else f"PgBouncer {path} mode"
        figures += [Figure(f"{where}: {label}", rate(path, name), "/s") for name, label in POOLED_CALLS.items()]
        figures += [
            Figure(f"{where}: update_activity / raw upsert", ratio(f"{path} update_activity", f"{path} upsert"), "x"),
            Figure(f"{where}: get / raw SELECT", ratio(f"{path} get", f"{path} raw_select"), "x"),
        ]
        if path != "direct":
            figures += [
                Figure(f"{where} / direct: {label}", ratio(f"{path} {name}", f"direct {name}"), "x")
                for name, label in POOLED_CALLS.items()
            ]
    for name, label in POOLED_CALLS.items():
        if name in ("update_activity", "get"):
            figures += [
                Figure(
                    f'direct, never preparing ("prepared_statements": False): {label}', rate("unprepared", name), "/s"
                ),
                Figure(
                    f"direct: {name}, never preparing / default (prepares)",
                    ratio(f"unprepared {name}", f"direct {name}"),
                    "x",
                ),
            ]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions; print, do not write RESULTS.md")
    parser.add_argument(
        "--only",
        nargs="+",
        type=int,
        choices=OWN_SECTIONS,
        help="run only these sections; print (and write with --write)",
    )
    parser.add_argument(
        "--write",
        action="store_true",
        help="with --only: replace those sections of RESULTS.md and its How: paragraph, the rest kept",
    )
    args = parser.parse_args()
    if args.write and (args.quick or not args.only):
        parser.error("--write goes with --only and without --quick (a full run writes RESULTS.md anyway)")
    chosen = set(args.only or OWN_SECTIONS)
    load_at_start = os.getloadavg()[0]  # other work on the machine: what absolute times suffered
    repeat = 5 if args.quick else 30
    disk = Path(tempfile.mkdtemp(prefix="exai-bench-", dir="/var/tmp"))
    os.chmod(disk, 0o755)  # our own directory: the server's OS user must enter it
    tmpfs_server = start_server(None)
    disk_server = start_server(disk, PYTEST_POSTGRESQL_DEFAULTS)
    baseline_tmpfs = start_server(None, PYTEST_POSTGRESQL_DEFAULTS)
    runs: dict[int, tuple[str, Callable[[], list[Figure]]]] = {
        1: (
            "1. A fresh database per test",
            lambda: per_test_database(tmpfs_server, disk_server, baseline_tmpfs, args.quick),
        ),
        2: ("2. The first test of a run", lambda: first_test(3 if args.quick else 9)),
        3: ("3. Manager speed", lambda: asyncio.run(manager_speed(tmpfs_server, repeat))),
        4: (
            "4. Recovery",
            lambda: asyncio.run(recovery(tmpfs_server, 20_000 if args.quick else 100_000, 1 if args.quick else 3)),
        ),
        5: ("5. Database kill and restart", lambda: asyncio.run(kill_and_restart(tmpfs_server, max(3, repeat // 6)))),
        6: (
            "6. Replica start over a large table",
            lambda: asyncio.run(start_over_table_sizes(tmpfs_server, (1_000, 1_000_000), max(5, repeat // 2))),
        ),
        7: ("7. Behind PgBouncer", lambda: asyncio.run(behind_pgbouncer(tmpfs_server, repeat))),
        9: ("9. Power loss", lambda: power_loss_section(tmpfs_server, args.quick)),
        10: ("10. Failover", lambda: failover_section(tmpfs_server, args.quick)),
    }
    sections: dict[int, tuple[str, list[Figure]]] = {}
    try:
        for number, (title, run) in runs.items():
            if number in chosen:
                sections[number] = (title, run())
    finally:
        tmpfs_server.stop()
        disk_server.stop()
        baseline_tmpfs.stop()
        disk.rmdir()
    header = (
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; PostgreSQL {tmpfs_server.version}; schema version {latest_version()}; "
        f"cluster on tmpfs (/dev/shm) unless stated. Medians of {repeat} runs where repeated. "
        f"1-minute load average {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end."
    )
    method = METHOD.format(
        pgbouncer=pgbouncer_version(),
        **POWER_LOSS_RUNS[args.quick],
        **{f"failover_{name}": count for name, count in FAILOVER_RUNS[args.quick].items()},
    )
    note = (
        f"Measured apart from the other sections: `python benchmarks/run.py --only "
        f"{' '.join(map(str, sorted(chosen)))} --write` on {time.strftime('%Y-%m-%d')}; 1-minute load average "
        f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; machine and versions as above."
    )
    blocks = {
        number: "\n".join(
            [
                f"### {title}",
                "",
                *([note, ""] if args.write else []),
                "| measure | value | target |",
                "|---|---|---|",
                *(f.line() for f in figures),
                "",
            ]
        )
        for number, (title, figures) in sections.items()
    }
    print("\n".join([header, "", method, "", *blocks.values()]))
    if args.write:
        head, _ = split_results(RESULTS.read_text())
        write_results(re.sub(r"^How: .*$", lambda _: method, head, count=1, flags=re.MULTILINE), blocks)
    elif not args.quick and not args.only:
        title = f"# Benchmark results\n\nWritten by `python benchmarks/run.py` on {time.strftime('%Y-%m-%d')}.\n"
        write_results(f"{title}\n{header}\n\n{method}\n", blocks)


def power_loss_section(tmpfs: TemporaryPostgres, quick: bool) -> list[Figure]:
    # Imported only here: power_loss.py imports this module, which must be whole by then.
    import power_loss  # noqa: PLC0415

    return asyncio.run(power_loss.measure(tmpfs, **POWER_LOSS_RUNS[quick]))


def failover_section(tmpfs: TemporaryPostgres, quick: bool) -> list[Figure]:
    # Imported only here, as power_loss is: failover.py imports this module.
    import failover  # noqa: PLC0415

    return asyncio.run(failover.measure(tmpfs, **FAILOVER_RUNS[quick]))


def split_results(text: str) -> tuple[str, dict[int, str]]:
    """RESULTS.md's text before its first section (``### N. ...``), and each section's text by its number."""
    head, *sections = re.split(r"\n(?=### \d+\. )", text)
    return head, {int(section[4 : section.index(".")]): section for section in sections}


def write_results(head: str, sections: dict[int, str]) -> None:
    """RESULTS.md: ``head``, then its sections in order, ``sections`` in place of those of their numbers."""
    _, kept = split_results(RESULTS.read_text()) if RESULTS.exists() else ("", {})
    merged = kept | sections
    RESULTS.write_text("\n".join([head, *(merged[number] for number in sorted(merged))]))


def sections_from(number: int) -> str:
    """RESULTS.md from its section ``number`` (``### N. ...``) to the end; empty if it has none."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    start = text.find(f"\n### {number}. ")
    return "" if start < 0 else text[start + 1 :]


if __name__ == "__main__":
    main()
