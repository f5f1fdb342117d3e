"""Where a get and an update_activity spend their time beyond the raw psycopg statement.

    python benchmarks/profile_calls.py            # the ladder, then a cProfile of each call
    python benchmarks/profile_calls.py --no-profile

A ladder of ways to run the same read (and the same write), from the raw baseline of
run.py's section 3 to the manager's call, each adding one layer: the store's statement on
the raw connection, the pooled connection (``Database.fetch_one``), the model
(``SessionStore``), the manager. Measured as run.py measures: alternating blocks, the
median of per-block ratios to the raw baseline, so a load change hits every rung alike.
Not part of RESULTS.md; it explains its figures.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from run import RAW_SELECT, RAW_UPSERT, alternating_rates, median_ratio, start_server

from pytest_exai_sessions import SessionManager
from pytest_exai_sessions.db import closed_by_server, tuple_cursor
from pytest_exai_sessions.server import TemporaryPostgres
from pytest_exai_sessions.store import _fetch_live_query, _fetch_query, _record_request_query, _to_session
from pytest_exai_sessions.testing.databases import TestDatabases

Call = Callable[[int], Awaitable[object]]


def ids(number: int) -> str:
    return f"m-{number % 100}"


def read_ladder(conn: psycopg.AsyncConnection[Any], manager: SessionManager, held: Any) -> dict[str, Call]:
    store = manager.store
    database = store.database  # type: ignore[union-attr]
    select = RAW_SELECT.as_string(conn)
    live_query = _fetch_live_query()
    any_state_query = _fetch_query()
    held_cursor = held.row_cursor()
    kept = tuple_cursor(conn.cursor(row_factory=tuple_row))

    def window(number: int) -> dict[str, Any]:
        return {"id": ids(number), **manager._window()}

    async def raw(number: int) -> object:
        return await (await conn.execute(select, (ids(number),))).fetchone()

    async def raw_kept_cursor(number: int) -> object:
        await kept.execute(select, (ids(number),))
        return await kept.fetchone()

    async def fetch_no_live_test(number: int) -> object:
        # The store's select list by session_id alone: what the liveness CASE and its two
        # timestamp parameters add is the difference to the next rung.
        await kept.execute(any_state_query, {"id": ids(number)})
        return await kept.fetchone()

    async def held_pooled(number: int) -> object:
        # The pool's own connection and cursor, taken once: the statement without getconn/putconn.
        await held_cursor.execute(live_query, window(number))
        return await held_cursor.fetchone()

    async def held_pooled_deadline(number: int) -> object:
        async with asyncio.timeout(database.answer_within):
            await held_cursor.execute(live_query, window(number))
            return await held_cursor.fetchone()

    async def raw_live_case(number: int) -> object:
        # The store's statement (the _LIVE_FOUND CASE, named parameters) on the raw connection.
        return await (await conn.execute(live_query, window(number))).fetchone()

    async def raw_live_case_kept_cursor(number: int) -> object:
        await kept.execute(live_query, window(number))
        return await kept.fetchone()

    async def pooled(number: int) -> object:
        return await database.fetch_one("bench", live_query, window(number))

    async def pooled_model(number: int) -> object:
        row = await database.fetch_one("bench", live_query, window(number))
        return None if row is None else _to_session(row)

    async def get(number: int) -> object:
        return await manager.get(ids(number))

    return {
        "raw SELECT (baseline)": raw,
        "  same, one kept tuple cursor + fast JSON": raw_kept_cursor,
        "+ store's statement (CASE, named params), raw conn": raw_live_case,
        "  same, one kept tuple cursor + fast JSON ": raw_live_case_kept_cursor,
        "  store's select list, session_id only (no CASE), kept cursor": fetch_no_live_test,
        "  the store's statement on a held pooled connection": held_pooled,
        "  same + asyncio.timeout": held_pooled_deadline,
        "+ pool (Database.fetch_one)": pooled,
        "+ Session.from_database": pooled_model,
        "manager.get": get,
    }


def write_ladder(conn: psycopg.AsyncConnection[Any], manager: SessionManager) -> dict[str, Call]:
    database = manager.store.database  # type: ignore[union-attr]
    query = _record_request_query()
    kept = tuple_cursor(conn.cursor(row_factory=tuple_row))

    def params(number: int) -> dict[str, Any]:
        return {"id": ids(number), "duration_ms": 5, **manager._window()}

    async def raw_upsert(number: int) -> object:
        return await conn.execute(RAW_UPSERT, (ids(number), 5))

    async def raw_upsert_kept_cursor(number: int) -> object:
        return await kept.execute(RAW_UPSERT, (ids(number), 5))

    async def raw_ours(number: int) -> object:
        await kept.execute(query, params(number))
        return await kept.fetchone()

    async def pooled(number: int) -> object:
        return await database.fetch_one("bench", query, params(number))

    async def pooled_model(number: int) -> object:
        row = await database.fetch_one("bench", query, params(number))
        return None if row is None else _to_session(row)

    async def update_activity(number: int) -> object:
        return await manager.update_activity(ids(number), 5)

    return {
        "raw upsert (baseline)": raw_upsert,
        "  same, one kept cursor": raw_upsert_kept_cursor,
        "+ store's UPDATE ... RETURNING 14 columns, kept cursor": raw_ours,
        "+ pool (Database.fetch_one)": pooled,
        "+ Session.from_database": pooled_model,
        "manager.update_activity": update_activity,
    }


async def ladder(ways: dict[str, Call], blocks: int, calls: int) -> None:
    def block(call: Call) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            for number in range(calls):
                await call(number)

        return run

    rates = await alternating_rates({name: block(call) for name, call in ways.items()}, blocks, calls)
    baseline = next(iter(rates))
    for name, measured in rates.items():
        per_call_us = 1e6 / statistics.median(measured)
        print(f"| {name} | {per_call_us:.0f} us | {median_ratio(measured, rates[baseline]):.3f} x |")


async def pieces(conn: psycopg.AsyncConnection[Any], manager: SessionManager, calls: int) -> None:
    """Each client-side piece alone, no statement: microseconds per call (median of 5 runs)."""
    database = manager.store.database  # type: ignore[union-attr]
    pool = database._pool
    kept = tuple_cursor(conn.cursor(row_factory=tuple_row))
    await kept.execute(_fetch_live_query(), {"id": "m-1", **manager._window()})
    row = await kept.fetchone()
    assert row is not None

    async def pool_pair() -> None:
        await pool.putconn(await pool.getconn())

    async def deadline() -> None:
        async with asyncio.timeout(database.answer_within):
            pass

    async def check() -> None:
        pooled = await pool.getconn()
        try:
            for _ in range(calls):
                closed_by_server(pooled)
        finally:
            await pool.putconn(pooled)

    async def model() -> None:
        _to_session(row)

    async def window() -> None:
        manager._window()

    for name, piece, repeat in (
        ("pool getconn + putconn", pool_pair, calls),
        ("the check that the server did not close it (closed_by_server)", check, 1),
        ("asyncio.timeout block", deadline, calls),
        ("_to_session (Session.from_database)", model, calls),
        ("manager._window (clock, stale_before)", window, calls),
    ):
        samples = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(repeat):
                await piece()
            samples.append((time.perf_counter() - started) / calls * 1e6)
        print(f"| {name} | {statistics.median(samples):.1f} us |")


async def profile(call: Call, calls: int, top: int) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for number in range(calls):
        await call(number)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    print(out.getvalue())


async def main(server: TemporaryPostgres, blocks: int, with_profile: bool) -> None:
    databases = TestDatabases(server)
    databases.create_template()
    dsn = server.dsn(databases.create_clone())
    try:
        async with (
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
            SessionManager.connect(dsn, max_concurrent_sessions=10_000, cleanup_interval_secs=0) as manager,
        ):
            for number in range(100):
                await manager.ensure(ids(number))
            pool = manager.store.database._pool  # type: ignore[union-attr]
            held = await pool.getconn()  # a second pooled connection stays for fetch_one (min_size 1)
            reads, writes = read_ladder(conn, manager, held), write_ladder(conn, manager)
            print("| read | per call | / raw SELECT |\n|---|---|---|")
            await ladder(reads, blocks, 200)
            print("\n| write | per call | / raw upsert |\n|---|---|---|")
            await ladder(writes, blocks, 200)
            print("\n| piece alone | per call |\n|---|---|")
            await pieces(conn, manager, 20_000)
            await pool.putconn(held)
            if with_profile:
                for name in ("raw SELECT (baseline)", "manager.get"):
                    print(f"\n## cProfile, 5000 x {name}")
                    await profile(reads[name], 5000, 18)
                print("\n## cProfile, 5000 x manager.update_activity")
                await profile(writes["manager.update_activity"], 5000, 18)
    finally:
        databases.drop_template()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    server = start_server(None)
    try:
        asyncio.run(main(server, args.blocks, not args.no_profile))
    finally:
        server.stop()
