"""Section 9 of run.py: what a power cut costs and what it loses, beside a SIGKILL of the server.

The power-loss server (``PowerLossPostgres``) keeps its data on an ext4 image, loop-mounted,
whose power ``CutPower`` cuts: what was not fsynced is gone. It runs with production
durability unless a setting says otherwise. Three measures:

- the time from the fault to accepting connections again, after a short burst of
  ``SessionManager`` writes, for a power cut and for a SIGKILL of the same server;
- the time of an ``update_activity`` there against the usual tmpfs server (fsync off);
- the acknowledged inserts lost per setting and fault: one client inserts rows and counts
  each acknowledged, the fault comes while it writes, and the rows present after recovery
  are counted against the acknowledged ones.

Needs root and loop devices (``power_loss_unsupported()`` says what is missing).
Not part of the test suite: nothing here is asserted.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from run import Figure, median_ratio, per_call_rates

from pytest_exai_sessions import SessionManager
from pytest_exai_sessions.server import ServerStartError, TemporaryPostgres, find_bindir, server_os_user
from pytest_exai_sessions.server.power_loss import PowerLossPostgres, power_loss_unsupported
from pytest_exai_sessions.testing.crash import Fault, KillDatabase
from pytest_exai_sessions.testing.crash.faults import CutPower
from pytest_exai_sessions.testing.databases import TestDatabases

WRITES_BEFORE_FAULT_SECS = 0.3  # the WAL a recovery replays: this long of one manager's writes
INSERTS_BEFORE_FAULT_SECS = 2.0
WAL_SINCE_CHECKPOINT = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), redo_lsn)::bigint FROM pg_control_checkpoint()"
# Over PRODUCTION_DURABILITY, the power-loss server's own settings.
SETTINGS: Mapping[str, Mapping[str, str]] = {
    "defaults": {},
    "synchronous_commit=off": {"synchronous_commit": "off"},
    "fsync=off": {"fsync": "off"},
}
FAULTS: Mapping[str, Callable[[PowerLossPostgres], Fault]] = {
    "SIGKILL of the server": KillDatabase,
    "power cut": CutPower,
}


def power_loss_server(settings: Mapping[str, str] | None = None) -> PowerLossPostgres:
    """A power-loss server with ``settings`` over production's; a ``with`` block starts and stops it."""
    return PowerLossPostgres(find_bindir(), os_user=server_os_user(None), settings=settings)


async def measure(tmpfs: TemporaryPostgres, *, cuts: int, blocks: int, trials: int) -> list[Figure]:
    reason = power_loss_unsupported()
    if reason is not None:
        return [Figure(f"not measured: {reason}", 0, "runs")]
    tmpfs_databases = TestDatabases(tmpfs)
    tmpfs_databases.create_template()
    try:
        with power_loss_server() as server:
            databases = TestDatabases(server)
            databases.create_template()
            dsn = server.dsn(databases.create_clone())
            server.sync()  # the schema made durable once: no cut below may take it
            times = await update_activity_times(dsn, tmpfs.dsn(tmpfs_databases.create_clone()), blocks)
            recoveries = await fault_to_ready(server, dsn, cuts)
            databases.disconnect()  # the server goes with its databases
            image_dir = server.basedir
    finally:
        tmpfs_databases.drop_template()
    losses = {(setting, fault): await acknowledged_losses(setting, fault, trials) for setting, fault in cells()}
    return [
        *recovery_figures(recoveries, cuts),
        *update_activity_figures(times, image_dir),
        *loss_figures(losses, trials),
    ]


# 1. From the fault to accepting connections


@dataclass
class Recovery:
    seconds: float  # from the fault to accepting connections
    wal_bytes: int  # WAL after the last checkpoint's redo point at the fault: what recovery replays
    calls: int  # ensure + update_activity pairs acknowledged before it


async def fault_to_ready(server: PowerLossPostgres, dsn: str, rounds: int) -> dict[str, list[Recovery]]:
    """Each fault in turn, ``rounds`` times, each after ``WRITES_BEFORE_FAULT_SECS`` of a manager's writes."""
    recoveries: dict[str, list[Recovery]] = {name: [] for name in FAULTS}
    for _ in range(rounds):
        for name, make_fault in FAULTS.items():
            manager = await SessionManager.open(dsn, max_concurrent_sessions=1000)
            try:
                calls = 0
                deadline = time.monotonic() + WRITES_BEFORE_FAULT_SECS
                while time.monotonic() < deadline:
                    session_id = f"w-{calls % 100}"
                    await manager.ensure(session_id)
                    await manager.update_activity(session_id, 5)
                    calls += 1
                wal_bytes = wal_since_checkpoint(dsn)
                fault = make_fault(server)
                started = time.monotonic()
                fault.inject()
                fault.recover()
                # A power cut counts from the cut itself (cut_at: the server was frozen first), a kill from its signal.
                seconds = time.monotonic() - (server.cut_at if isinstance(fault, CutPower) else started)
                recoveries[name].append(Recovery(seconds, wal_bytes, calls))
            finally:
                await manager.aclose()
    return recoveries


def wal_since_checkpoint(dsn: str) -> int:
    """Bytes of WAL past the last checkpoint's redo point: what a crash now would make recovery replay."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        [(wal_bytes,)] = conn.execute(WAL_SINCE_CHECKPOINT).fetchall()
    return int(wal_bytes)


def recovery_figures(recoveries: dict[str, list[Recovery]], rounds: int) -> list[Figure]:
    figures = []
    for name, runs in recoveries.items():
        seconds = [run.seconds for run in runs]
        figures += [
            Figure(f"{name} to accepting connections, median of {rounds}", statistics.median(seconds) * 1000, "ms"),
            Figure(f"{name} to accepting connections, max", max(seconds) * 1000, "ms"),
            Figure(
                f"{name}: WAL since the last checkpoint at the fault (replayed), median",
                statistics.median(run.wal_bytes for run in runs) / 1024,
                f"KiB (after {statistics.median_low(run.calls for run in runs):,} ensure + update_activity, median)",
            ),
        ]
    cut, kill = ([run.seconds for run in recoveries[name]] for name in ("power cut", "SIGKILL of the server"))
    return [*figures, Figure("power cut / SIGKILL, to accepting connections", median_ratio(cut, kill), "x")]


# 2. update_activity with production durability


async def update_activity_times(power_loss_dsn: str, tmpfs_dsn: str, blocks: int) -> dict[str, list[float]]:
    """Section 3's ``update_activity`` on 100 sessions of each server, alternating blocks of 200; calls per second."""
    async with (
        SessionManager.connect(power_loss_dsn, max_concurrent_sessions=10_000, cleanup_interval_secs=0) as power_loss,
        SessionManager.connect(tmpfs_dsn, max_concurrent_sessions=10_000, cleanup_interval_secs=0) as tmpfs,
    ):
        for number in range(100):
            await power_loss.ensure(f"m-{number}")
            await tmpfs.ensure(f"m-{number}")
        return await per_call_rates({"power loss": counting(power_loss), "tmpfs": counting(tmpfs)}, blocks, calls=200)


def counting(manager: SessionManager) -> Callable[[int], Awaitable[None]]:
    async def update_activity(number: int) -> None:
        await manager.update_activity(f"m-{number % 100}", 5)

    return update_activity


def update_activity_figures(rates: dict[str, list[float]], image_dir: Path) -> list[Figure]:
    power_loss, tmpfs = rates["power loss"], rates["tmpfs"]
    return [
        Figure(
            f"update_activity, power-loss server (production durability; ext4 on a loop device, image in {image_dir})",
            statistics.median(1000 / rate for rate in power_loss),
            "ms",
        ),
        Figure(
            "update_activity, the usual tmpfs server (fsync off)",
            statistics.median(1000 / rate for rate in tmpfs),
            "ms",
        ),
        Figure("update_activity time, power-loss / tmpfs", median_ratio(tmpfs, power_loss), "x"),
    ]


# 3. Acknowledged inserts lost


def cells() -> Iterator[tuple[str, str]]:
    for setting in SETTINGS:
        for fault in FAULTS:
            yield setting, fault


@dataclass
class Trial:
    acknowledged: int  # inserts whose execute returned, rows 1 to this
    present: int  # of those, the rows found after recovery
    in_flight_present: bool  # the row sent but not acknowledged when the fault came is there
    outcome: str  # "counted", "table lost", "did not recover"

    @property
    def lost(self) -> int:
        return self.acknowledged - self.present


@dataclass
class Inserts:
    """The client's record: rows 1..``acknowledged`` acknowledged, row ``in_flight`` sent and never answered."""

    acknowledged: int = 0
    in_flight: int | None = None
    faulted: bool = False  # set before the fault: the client sends nothing after it


async def acknowledged_losses(setting: str, fault: str, trials: int) -> list[Trial]:
    """``trials`` of ``fault`` on a server with ``setting``; a fresh server after one that did not come back."""
    results: list[Trial] = []
    while len(results) < trials:
        with power_loss_server(SETTINGS[setting]) as server:
            while len(results) < trials:
                results.append(await insert_and_fault(server, f"trial_{len(results)}", FAULTS[fault](server)))
                if results[-1].outcome == "did not recover":
                    break
    return results


async def insert_and_fault(server: PowerLossPostgres, dbname: str, fault: Fault) -> Trial:
    """Insert rows 1, 2, ... into a fresh durable table one at a time, the fault while it writes; count what is left."""
    with psycopg.connect(server.dsn(), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    dsn = server.dsn(dbname)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE acked (n int PRIMARY KEY)")
        conn.execute("CHECKPOINT")
    server.sync()  # the table itself is on the disk whatever the settings; only the inserts are at stake
    inserts = Inserts()
    client = asyncio.create_task(insert_rows(dsn, inserts))
    await asyncio.sleep(INSERTS_BEFORE_FAULT_SECS)
    if client.done():
        await client  # its error, if it raised one
        raise AssertionError(f"the client stopped before the fault: {inserts}")
    inserts.faulted = True
    # Both synchronous: the event loop, and so the client, stands still from the fault until
    # the server is back, with its last insert sent and not yet answered.
    fault.inject()
    try:
        fault.recover()
    except ServerStartError:
        recovered = False
    else:
        recovered = True
    await asyncio.wait_for(client, timeout=30)
    if not recovered:
        return Trial(inserts.acknowledged, 0, False, "did not recover")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE n <= %(acked)s), count(*) FILTER (WHERE n > %(acked)s) FROM acked",
                {"acked": inserts.acknowledged},
            ).fetchone()
    except psycopg.errors.UndefinedTable:
        return Trial(inserts.acknowledged, 0, False, "table lost")
    assert row is not None
    present, unacknowledged = row
    if unacknowledged > (0 if inserts.in_flight is None else 1):
        raise AssertionError(f"{unacknowledged} rows present past the {inserts.acknowledged} acknowledged, {inserts}")
    return Trial(inserts.acknowledged, present, unacknowledged == 1, "counted")


async def insert_rows(dsn: str, inserts: Inserts) -> None:
    """The client: one autocommit connection, one row per statement, as fast as it goes, until the fault."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while not inserts.faulted:
            number = inserts.acknowledged + 1
            try:
                await conn.execute("INSERT INTO acked (n) VALUES (%s)", (number,))
            except psycopg.OperationalError:
                inserts.in_flight = number  # its outcome unknown: never counted as acknowledged
                return
            inserts.acknowledged = number


def loss_figures(losses: dict[tuple[str, str], list[Trial]], trials: int) -> list[Figure]:
    figures = []
    for (setting, fault), results in losses.items():
        lost = [trial.lost for trial in results]
        losing = sum(1 for count in lost if count > 0)
        noted = {
            "table lost": sum(1 for trial in results if trial.outcome == "table lost"),
            "did not recover": sum(1 for trial in results if trial.outcome == "did not recover"),
            "the table there but empty": sum(
                1 for trial in results if trial.outcome == "counted" and trial.present == 0 < trial.acknowledged
            ),
            "the row in flight present": sum(1 for trial in results if trial.in_flight_present),
        }
        detail = (
            f"of {trials} trials lose some: median {statistics.median_low(lost):,}, max {max(lost):,} lost, of a "
            f"median {statistics.median_low(trial.acknowledged for trial in results):,} acknowledged"
            + "".join(f"; {note} in {count}" for note, count in noted.items() if count)
        )
        defaults = setting == "defaults"
        figures.append(
            Figure(
                f"acknowledged inserts lost: {setting}, {fault}",
                losing,
                detail,
                "none lost" if defaults else "",
                losing == 0 if defaults else None,
            )
        )
    return figures
