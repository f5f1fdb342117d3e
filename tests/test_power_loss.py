"""Power loss: a cut of the database's disk drops every write not yet durable, and the ledger tells who lost what.

A SIGKILL of the server keeps the kernel's page cache, so it cannot tell a server that
flushes its commits from one that does not. The power cut can: these tests show that it
keeps everything under production durability, and catches the settings that lose writes.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import hypothesis
import psycopg
import pytest
from pg_leftovers import read_proc, wait_until_gone

from pytest_exai_sessions.server import InitdbCache, find_bindir, server_os_user
from pytest_exai_sessions.server.cluster import FROM_INITDB_CACHE, FROM_INITDB_CACHE_BUILT, sweep_stale_clusters
from pytest_exai_sessions.server.power_loss import PRODUCTION_DURABILITY, PowerLossPostgres, power_loss_unsupported
from pytest_exai_sessions.server.private_directory import mounts_inside
from pytest_exai_sessions.testing.crash import AfterSeconds, CrashHarness, KillDatabase, PowerLossUnrecoverable
from pytest_exai_sessions.testing.stateful import SessionCrashMachine, run_crash_machine
from pytest_exai_sessions.testing.workloads import mixed_workload, replica_workload

MANY = {"max_concurrent_sessions": 1000}
CUTS = 10


def setting(harness, name: str) -> str:
    with psycopg.connect(harness.dsn) as conn:
        return conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0]


@pytest.mark.asyncio
async def test_the_server_runs_production_durability_on_a_disk_of_its_own(power_loss_harness):
    server = power_loss_harness.server
    assert isinstance(server, PowerLossPostgres)
    for name, value in PRODUCTION_DURABILITY.items():
        assert setting(power_loss_harness, name) == value
    assert server.disk is not None and server.disk.mounted
    assert server.datadir.is_relative_to(server.disk.mount_point)
    with psycopg.connect(power_loss_harness.dsn) as conn:  # the run's template: the unified schema
        assert conn.execute("SELECT to_regclass('public.sessions')").fetchone() == ("sessions",)


@pytest.mark.asyncio
async def test_cut_power_keeps_what_was_acknowledged_and_managers_reconnect(power_loss_harness):
    manager = await power_loss_harness.new_manager()
    created = [await manager.ensure(f"before-{n}", data={"n": n}) for n in range(20)]

    seconds = power_loss_harness.cut_power()

    assert seconds > 0  # its size is a figure of the benchmarks, not a bound of a test
    for session in created:  # the same manager, through connections the cut broke
        assert await manager.get(session.session_id) == session
    assert power_loss_harness.server.cut_at is not None


@pytest.mark.asyncio
async def test_defaults_lose_no_acknowledged_write_at_random_cut_points(power_loss_harness):
    rng = random.Random(27)
    reports = []
    for cut in range(CUTS):
        report = await power_loss_harness.run_and_cut_power(
            mixed_workload, cut_after_acks=rng.randint(1, 400), params={"seed": cut}, **MANY
        )
        reports.append(report)
    lost = [report for report in reports if not report.ok]
    assert not lost, "\n\n".join(str(report.violations[0]) for report in lost)
    assert sum(report.acknowledged for report in reports) >= CUTS


@pytest.mark.slow
@pytest.mark.asyncio
@pytest.mark.parametrize("seed", range(2))
async def test_defaults_lose_nothing_over_many_more_cuts(power_loss_harness, seed):
    rng = random.Random(seed)
    for cut in range(15):
        if rng.random() < 0.5:
            report = await power_loss_harness.run_and_cut_power(
                mixed_workload, cut_after_acks=rng.randint(1, 2000), params={"seed": cut, "workers": 4}, **MANY
            )
        else:
            report = await power_loss_harness.run_and_cut_power(
                mixed_workload, cut_after_secs=rng.uniform(0.05, 1.5), params={"seed": cut}, **MANY
            )
        report.assert_ok()


@pytest.mark.slow  # 10 cuts after 2 s each; the replica and state machine tests show the loss by default
@pytest.mark.asyncio
@pytest.mark.exai_power_loss(settings={"synchronous_commit": "off"})
async def test_synchronous_commit_off_loses_acknowledged_writes(power_loss_harness):
    assert setting(power_loss_harness, "synchronous_commit") == "off"
    losing = 0
    for cut in range(CUTS):
        # One writer: every write of the last moment before the cut is lost all the same.
        report = await power_loss_harness.run_and_cut_power(
            mixed_workload, cut_after_secs=2.0, params={"seed": cut, "workers": 1}, **MANY
        )
        losing += not report.ok
    assert losing >= 9, f"only {losing} of {CUTS} cuts found an acknowledged write lost"


@pytest.mark.asyncio
@pytest.mark.exai_power_loss(settings={"fsync": "off"})
async def test_fsync_off_is_never_a_pass(power_loss_harness):
    try:
        report = await power_loss_harness.run_and_cut_power(mixed_workload, cut_after_secs=1.0, **MANY)
    except PowerLossUnrecoverable as error:
        assert "after the power cut" in str(error)
        assert "server log:" in str(error) or "did not start" in str(error)
    else:
        assert not report.ok, report.summary()


@pytest.mark.asyncio
@pytest.mark.exai_power_loss(settings={"fsync": "off"})
async def test_a_server_kill_cannot_tell_fsync_off_from_durable(power_loss_harness):
    """What the power cut adds: the same settings pass every SIGKILL of the whole server."""
    kill = KillDatabase(power_loss_harness.server, "kill", power_loss_harness.database)
    for cut in range(3):
        report = await power_loss_harness.run_with_fault(
            mixed_workload, at=AfterSeconds(1.0), fault=kill, params={"seed": cut}, **MANY
        )
        report.assert_ok()


@pytest.mark.asyncio
async def test_replicas_lose_nothing_when_the_power_goes(power_loss_harness):
    report = await power_loss_harness.run_replicas_and_cut_power(
        replica_workload, replicas=3, cut_after_acks=600, params={"steps": 400}, **MANY
    )
    report.assert_ok()
    assert report.replicas >= 2  # replicas start one after another: a late one may not have written yet
    assert report.acknowledged >= 600
    assert report.killed_at == "3 replicas after 600 acknowledged operations"


@pytest.mark.asyncio
@pytest.mark.exai_power_loss(settings={"synchronous_commit": "off"})
async def test_replicas_under_synchronous_commit_off_lose_writes(power_loss_harness):
    losing = 0
    for seed in range(2):
        report = await power_loss_harness.run_replicas_and_cut_power(
            replica_workload, cut_after_secs=1.0, seed=seed, params={"steps": 100_000, "prefix": f"s{seed}-"}, **MANY
        )
        losing += not report.ok
    assert losing >= 1, "neither cut found an acknowledged write lost"


@pytest.mark.asyncio
async def test_the_power_goes_at_a_named_fault_point(power_loss_harness):
    report = await power_loss_harness.run_and_cut_power("crash_workloads:counting_with_a_fault_point", cut_at="halfway")

    report.assert_ok()
    assert report.killed_at == "at fault point 'halfway'"
    assert report.acknowledged == 10 + 5 * 10  # the ensures and five rounds, all before the point
    assert report.recovered == 10


@pytest.mark.asyncio
async def test_a_cut_point_is_chosen_once(power_loss_harness):
    with pytest.raises(ValueError, match="choose exactly one of cut_after_acks, cut_after_secs and cut_at"):
        await power_loss_harness.run_and_cut_power(mixed_workload, cut_after_acks=3, cut_after_secs=1.0)
    with pytest.raises(ValueError, match="choose exactly one of cut_after_acks"):
        await power_loss_harness.run_and_cut_power(mixed_workload)


@pytest.mark.asyncio
async def test_the_usual_harness_has_no_power_to_cut(crash_harness):
    with pytest.raises(pytest.skip.Exception, match="power_loss_harness"):
        crash_harness.cut_power()


class PowerCutMachine(SessionCrashMachine):
    """The stateful crash machine, with power cuts on the power-loss server (database kills left out)."""

    database_crashes = False
    replicas = 2


def counting_cuts(monkeypatch) -> list[float]:
    cuts: list[float] = []
    original = CrashHarness.cut_power

    def counting(self):
        cuts.append(original(self))
        return cuts[-1]

    monkeypatch.setattr(CrashHarness, "cut_power", counting)
    return cuts


def run_power_cut_machine(harness, **settings) -> None:
    """Derandomized: whether an example cuts the power is no matter of luck."""
    run_crash_machine(
        PowerCutMachine,
        harness.dsn,
        harness.server,
        settings=hypothesis.settings(
            PowerCutMachine.hypothesis_settings(), database=None, derandomize=True, **settings
        ),
        clock=harness.clock,
    )


def test_the_state_machine_cuts_the_power_and_recovers_every_acknowledged_session(power_loss_harness, monkeypatch):
    cuts = counting_cuts(monkeypatch)
    run_power_cut_machine(power_loss_harness, max_examples=6, stateful_step_count=10)
    assert cuts, "no power cut in 6 examples"


@pytest.mark.exai_power_loss(settings={"synchronous_commit": "off"})
def test_the_state_machine_finds_what_synchronous_commit_off_loses(power_loss_harness, monkeypatch):
    cuts = counting_cuts(monkeypatch)
    with pytest.raises(AssertionError, match="after a power cut") as lost:
        run_power_cut_machine(
            power_loss_harness,
            max_examples=20,
            stateful_step_count=12,
            phases=[hypothesis.Phase.generate],  # the loss is what is shown here, not its shortest sequence
        )
    assert "differs from the model" in str(lost.value)
    assert cuts


# A run that starts a power-loss server, writes, and is killed with its disk still mounted.
KILLED_RUN = """
import os, signal, sys
from pathlib import Path
import psycopg
from pytest_exai_sessions.server import find_bindir, server_os_user
from pytest_exai_sessions.server.power_loss import PowerLossPostgres

server = PowerLossPostgres(find_bindir(None), basedir=Path(sys.argv[1]), os_user=server_os_user(None)).start()
with psycopg.connect(server.dsn(), autocommit=True) as conn:
    conn.execute("CREATE TABLE written (n int)")
print(server.root, server.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def loop_devices_of(directory: Path) -> list[str]:
    """The loop devices whose backing file lies in ``directory``."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing.read_text().strip().startswith(str(directory)):
                found.append(backing.parent.parent.name)
    return found


def test_the_next_run_sweeps_the_mounted_disk_of_a_killed_run(basedir):
    reason = power_loss_unsupported()
    if reason is not None:
        pytest.skip(reason)
    run = subprocess.run([sys.executable, "-c", KILLED_RUN, str(basedir)], capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr
    root_text, postmaster_pid = run.stdout.split()
    left = Path(root_text)
    postmaster = read_proc(int(postmaster_pid))
    if postmaster is not None:
        assert not wait_until_gone([postmaster]), "the postmaster outlived the run that started it"
    # The leftover is real: the disk is still mounted, on a loop device, in the killed run's directory.
    assert mounts_inside(left) == [left / "disk"]
    assert loop_devices_of(left)

    assert sweep_stale_clusters(basedir) == [left]

    assert not left.exists()
    assert mounts_inside(left) == []
    assert loop_devices_of(left) == []
    assert list(basedir.iterdir()) == []


def test_stop_leaves_no_mount_loop_device_or_file(basedir, exai_config):
    reason = power_loss_unsupported()
    if reason is not None:
        pytest.skip(reason)
    with PowerLossPostgres(find_bindir(exai_config.pg_bin), basedir=basedir, os_user=server_os_user(None)) as server:
        root = server.root
        assert root is not None and mounts_inside(root) == [root / "disk"]
        server.cut_power()  # a test may end with its disk cut
    assert mounts_inside(root) == [] and loop_devices_of(root) == []
    assert list(basedir.iterdir()) == []


def test_where_no_disk_can_lose_power_the_reason_says_what_is_needed(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert power_loss_unsupported() == "power loss needs root, to mount a loop device; this run's uid is 1000"


def test_a_test_that_needs_the_power_loss_server_skips_with_one_line_where_there_is_none(pytester):
    pytester.makeconftest(
        """
        import pytest

        import pytest_exai_sessions.plugin.power_loss as power_loss

        @pytest.fixture(scope="session", autouse=True)
        def as_if_not_root():
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(power_loss, "power_loss_unsupported", lambda: "power loss needs root (uid 1000)")
                yield
        """
    )
    pytester.makepyfile(
        """
        def test_cut(power_loss_harness):
            power_loss_harness.cut_power()

        def test_other():
            pass
        """
    )
    result = pytester.runpytest("-rs", "-p", "no:randomly")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED *: no power-loss server here: power loss needs root (uid 1000)"])


def test_the_runs_settings_schema_and_clock_reach_the_power_loss_server_and_a_marker_overrides_them(pytester):
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\nexai_migrations = schema.sql\n")
    pytester.makefile(".sql", schema="CREATE TABLE public.app_orders (id bigint PRIMARY KEY);")
    pytester.makepyfile(
        """
        import psycopg
        import pytest

        def setting(harness, name):
            with psycopg.connect(harness.dsn) as conn:
                return conn.execute("SELECT current_setting(%s)", (name,)).fetchone()[0]

        def test_run_settings(power_loss_harness):
            assert setting(power_loss_harness, "synchronous_commit") == "off"
            assert setting(power_loss_harness, "fsync") == "on"

        def test_the_runs_template_and_clock(power_loss_harness):
            with psycopg.connect(power_loss_harness.dsn) as conn:
                assert conn.execute("SELECT to_regclass('public.app_orders')").fetchone() == ("app_orders",)
                assert conn.execute("SELECT unified.clock_now()").fetchone()[0].year == 2031
            assert power_loss_harness.clock.now().year == 2031

        @pytest.mark.exai_power_loss(settings={"synchronous_commit": "local"})
        def test_marker(power_loss_harness):
            assert setting(power_loss_harness, "synchronous_commit") == "local"

        @pytest.mark.exai_power_loss("synchronous_commit")
        def test_bad_marker(power_loss_harness):
            pass
        """
    )
    result = pytester.runpytest(
        "-p", "no:randomly", "--exai-pg-setting", "synchronous_commit=off", "--exai-clock=2031-05-01T12:00:00Z"
    )
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*@pytest.mark.exai_power_loss takes only settings={name: value}*"])


@pytest.mark.asyncio
async def test_the_disk_comes_back_while_another_mount_namespace_holds_the_old_one(power_loss_harness):
    """Seen in CI: a run in a namespace of its own (``unshare -m``) copied the mount; after the cut
    ``mount -o loop`` reused the loop device that copy kept bound, and got the shut-down filesystem."""
    holder = subprocess.Popen(["unshare", "--mount", "sleep", "60"])
    try:
        namespace = f"/proc/{holder.pid}/ns/mnt"
        while os.readlink(namespace) == os.readlink("/proc/self/ns/mnt"):  # until it has unshared
            time.sleep(0.001)
        manager = await power_loss_harness.new_manager()
        before = await manager.ensure("kept", data={"n": 1})

        power_loss_harness.cut_power()

        assert await manager.get("kept") == before
        assert (await manager.ensure("written after", data={"n": 2})).data == {"n": 2}
    finally:
        holder.kill()
        holder.wait()


def test_power_on_starts_over_the_empty_lock_file_an_unsynced_start_leaves(basedir, exai_config):
    """With fsync=off the cut can keep postmaster.pid's name but not its content, and PostgreSQL
    refuses to start over an empty one: power_on removes it."""
    reason = power_loss_unsupported()
    if reason is not None:
        pytest.skip(reason)
    bindir = find_bindir(exai_config.pg_bin)
    with PowerLossPostgres(bindir, basedir=basedir, os_user=server_os_user(None), settings={"fsync": "off"}) as server:
        server.cut_power()
        server.disk.unmount()  # the disk back, to leave the lock file as such a cut can
        server.disk.mount()
        lock_file = server.datadir / "postmaster.pid"
        lock_file.write_bytes(b"")
        server.disk.sync()

        server.power_on()

        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert list(basedir.iterdir()) == []


def test_a_server_a_cut_may_have_broken_serves_no_further_test(pytester):
    pytester.makepyfile(
        """
        import contextlib

        import pytest

        from pytest_exai_sessions.testing.crash import PowerLossUnrecoverable

        roots = {}

        @pytest.mark.exai_power_loss(settings={"fsync": "False"})
        def test_a_cut_without_fsync(power_loss_harness):
            roots["unprotected"] = power_loss_harness.server.root
            with contextlib.suppress(PowerLossUnrecoverable):  # the test's database may be gone: fsync is off
                power_loss_harness.cut_power()

        @pytest.mark.exai_power_loss(settings={"fsync": "False"})
        def test_the_next_gets_a_new_server(power_loss_harness):
            assert power_loss_harness.server.root != roots["unprotected"]

        def test_a_cut_with_production_durability(power_loss_harness):
            roots["protected"] = power_loss_harness.server.root
            power_loss_harness.cut_power()

        def test_the_next_keeps_that_server(power_loss_harness):
            assert power_loss_harness.server.root == roots["protected"]
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=4)


def test_a_cold_initdb_cache_builds_onto_the_disk_of_another_filesystem(basedir, exai_config):
    """The cache's build moves initdb's output into place; the power-loss disk is another filesystem."""
    reason = power_loss_unsupported()
    if reason is not None:
        pytest.skip(reason)
    cache = InitdbCache(basedir / "cache")
    bindir = find_bindir(exai_config.pg_bin)
    for expected in (FROM_INITDB_CACHE_BUILT, FROM_INITDB_CACHE):
        with PowerLossPostgres(bindir, basedir=basedir, os_user=server_os_user(None), initdb_cache=cache) as server:
            assert server.cluster_source == expected
            with psycopg.connect(server.dsn(), autocommit=True) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
    shutil.rmtree(basedir / "cache")
