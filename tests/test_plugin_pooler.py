"""--exai-pooler: inner pytest runs (pytester) whose tests reach a real PostgreSQL through a real PgBouncer.

Inner tests write what they saw to ``facts.jsonl``; the outer test checks those facts, the
report, PgBouncer's admin console, and the machine's processes and directories afterwards.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg_leftovers import Proc, left_in, processes, wait_until_gone

from pytest_exai_sessions.plugin.config import OPTIONS, ExaiConfig
from pytest_exai_sessions.server import PostgresServer
from pytest_exai_sessions.server.pooler import (
    PGBOUNCER_ENV,
    PoolMode,
    pgbouncer_version,
)

INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"

# What the inner tests share: a module of helpers (not the conftest: an in-process run would
# find the outer run's conftest under that name) and a fixture that reports facts.
HELPERS = """
import json
import os
import pathlib

import psycopg

FACTS = pathlib.Path(__file__).with_name("facts.jsonl")


def through_a_pooler(dsn):
    # PgBouncer hands its client a made-up backend key; a direct connection gets the backend's own pid.
    with psycopg.connect(dsn, autocommit=True) as conn:
        (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()
        return pid != conn.info.backend_pid


def where(dsn):
    params = psycopg.conninfo.conninfo_to_dict(dsn)
    return [params["host"], int(params["port"]), params["dbname"]]


def process(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return {"pid": pid, "ppid": int(fields[1]), "start": int(fields[19]), "uid": os.stat(f"/proc/{pid}").st_uid}


def show(pooler, what):
    # PgBouncer's admin console: the database "pgbouncer", as the server's user.
    with psycopg.connect(pooler.dsn("pgbouncer"), autocommit=True) as admin:
        cursor = admin.execute(f"SHOW {what}")
        columns = [column.name for column in cursor.description]
        return [dict(zip(columns, row)) for row in cursor.fetchall()]


def write_facts(test, **facts):
    with FACTS.open("a") as f:
        f.write(json.dumps({"test": test, **facts}) + "\\n")
"""

CONFTEST = """
import pytest

from inner_helpers import write_facts


@pytest.fixture
def report(request):
    return lambda **facts: write_facts(request.node.name, **facts)
"""


@pytest.fixture(autouse=True)
def plugin_environment(exai_config: ExaiConfig, monkeypatch: pytest.MonkeyPatch, pytester: pytest.Pytester) -> None:
    """Inner runs start from no plugin configuration (the outer run's is read first), with the shared conftest."""
    for option in OPTIONS:
        if option.env:
            monkeypatch.delenv(option.env, raising=False)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(inner_helpers=HELPERS)


def facts(pytester: pytest.Pytester) -> dict[str, dict[str, Any]]:
    """The facts the inner tests reported, by test name (later reports of a test update earlier ones)."""
    path = pytester.path / "facts.jsonl"
    found: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        found.setdefault(record["test"], {}).update(record)
    return found


def server_uid() -> int:
    return pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()


def pgbouncers_in(basedir: Path) -> list[Proc]:
    """Running PgBouncers whose configuration lies under ``basedir``."""
    return [p for p in processes().values() if p.argv and Path(p.argv[0]).name == "pgbouncer" and p.mentions(basedir)]


def assert_nothing_left(basedir: Path, *reported: dict[str, Any]) -> None:
    """No process the run reported (a PgBouncer, a postmaster) runs on, and its base directory is empty."""
    started = [Proc(p["pid"], p["ppid"], "", p["start"], ()) for p in reported]
    assert not wait_until_gone(started), "PgBouncer or PostgreSQL outlived the run"
    assert not pgbouncers_in(basedir)
    assert left_in(basedir) == [], "the run left directories behind"


# the option


@pytest.mark.parametrize(
    "sources",
    [
        # ini, env, command line -> the pool mode of the run
        pytest.param((None, None, None, None), id="default-off"),
        pytest.param(("session", None, None, "session"), id="ini"),
        pytest.param(("session", "Transaction", None, "transaction"), id="env-over-ini"),
        pytest.param((None, None, "session", "session"), id="command-line"),
        pytest.param(("session", "transaction", "off", None), id="command-line-off-over-env-and-ini"),
        pytest.param(("transaction", "", None, None), id="empty-env-is-off"),
        pytest.param((None, "none", "transaction", "transaction"), id="command-line-over-env"),
    ],
)
def test_the_option_from_each_source_and_the_header(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, pgbouncer_binary: Path, sources: tuple[str | None, ...]
) -> None:
    ini, env, cli, expected = sources
    pytester.makeini(INI + (f"exai_pooler = {ini}\n" if ini is not None else ""))
    if env is not None:
        monkeypatch.setenv("EXAI_SESSIONS_POOLER", env)
    pytester.makepyfile(
        """
        from inner_helpers import through_a_pooler

        def test_pooler(exai_config, exai_pooler, exai_dsn, exai_direct_dsn, report):
            report(
                option=exai_config.pooler,
                mode=exai_pooler.mode if exai_pooler is not None else None,
                through=through_a_pooler(exai_dsn),
                direct_through=through_a_pooler(exai_direct_dsn),
                same=exai_direct_dsn == exai_dsn,
            )
        """
    )
    result = pytester.runpytest(*([f"--exai-pooler={cli}"] if cli is not None else []))
    result.assert_outcomes(passed=1)
    seen = facts(pytester)["test_pooler"]
    assert (seen["option"], seen["mode"]) == (expected, expected)
    assert seen["through"] is (expected is not None)
    assert seen["direct_through"] is False
    assert seen["same"] is (expected is None)
    if expected is None:
        assert "PgBouncer" not in result.stdout.str()
    else:
        result.stdout.fnmatch_lines(
            [
                "exai-sessions: PostgreSQL *",
                f"exai-sessions: tests connect through PgBouncer {pgbouncer_version(pgbouncer_binary)} "
                f"({pgbouncer_binary}) in "
                f"{expected} pool mode on a private socket (--exai-pooler); templates, clones and drops connect "
                "directly",
            ]
        )


@pytest.mark.parametrize(
    ("args", "env", "given"),
    [(["--exai-pooler=statement"], None, "'statement'"), ([], "bouncy", "'bouncy'")],
    ids=["command-line", "env"],
)
def test_a_bad_value_is_one_usage_error_naming_the_allowed_ones(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, args: list[str], env: str | None, given: str
) -> None:
    if env is not None:
        monkeypatch.setenv("EXAI_SESSIONS_POOLER", env)
    pytester.makeini(INI)
    pytester.makepyfile("def test_needs_a_database(exai_dsn):\n    pass\n")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"ERROR: --exai-pooler expects transaction, session, or none/off for no pooler, got {given}"]
    )
    assert "Traceback" not in result.stderr.str() + result.stdout.str()
    assert "passed" not in result.stdout.str()


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["one-process", "xdist"])
def test_without_a_binary_the_option_fails_the_run_once_and_exai_pgbouncer_skips(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, xdist: list[str]
) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    # Searched on PATH only, which holds nothing: the system directories PgBouncer's search
    # also looks in do not count when the variable names the binary.
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv(PGBOUNCER_ENV, "pgbouncer")
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        def test_needs_a_database(exai_dsn):
            pass

        def test_needs_it_too(session_manager):
            pass

        def test_asks_for_a_pooler(exai_pgbouncer):
            exai_pgbouncer("transaction")

        def test_needs_nothing():
            pass
        """
    )
    result = pytester.runpytest_subprocess("--exai-pooler=transaction", *xdist)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    message = (
        f"ERROR: no pgbouncer binary: {PGBOUNCER_ENV}='pgbouncer' is neither an executable file nor a command on "
        "PATH; install PgBouncer (Debian/Ubuntu: apt-get install pgbouncer; *"
    )
    result.stderr.fnmatch_lines([message])
    output = result.stdout.str() + result.stderr.str()
    assert output.count("no pgbouncer binary") == 1
    assert "Traceback" not in output and "passed" not in output

    # Without the option nothing needs it: the test that asks for a pooler skips, saying why.
    result = pytester.runpytest_subprocess("-rs", "-k", "asks_for_a_pooler or needs_nothing", *xdist)
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED *no pgbouncer binary: *apt-get install pgbouncer*"])


# everything through it


@pytest.mark.usefixtures("pgbouncer_binary")
@pytest.mark.parametrize(
    ("mode", "tcp"), [("transaction", False), ("session", True)], ids=["transaction", "session-tcp"]
)
def test_every_fixture_connects_through_the_pooler_and_exai_direct_dsn_does_not(
    pytester: pytest.Pytester, basedir: Path, mode: str, tcp: bool
) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        import os

        import pytest

        from inner_helpers import process, show, through_a_pooler, where
        from pytest_exai_sessions.plugin import factories

        other_dsn = factories.database()
        at_008_dsn = factories.database(unified_schema=8)


        @pytest.mark.asyncio
        async def test_every_dsn(
            exai_pooler, exai_pg_server, exai_dsn, other_dsn, at_008_dsn, exai_shared_dsn, exai_rollback_conn,
            session_store, session_manager, session_manager_factory, session_replicas, event_store,
            exai_db_clock, crash_harness, exai_pgbouncer, report,
        ):
            replicas = await session_replicas(2)
            factory_manager = await session_manager_factory()
            harness_manager = await crash_harness.new_manager()
            dsns = {
                "exai_dsn": exai_dsn,
                "other_dsn": other_dsn,
                "at_008_dsn": at_008_dsn,
                "exai_shared_dsn": exai_shared_dsn,
                "session_store": session_store.conninfo,
                "session_manager": session_manager.store.conninfo,
                "session_manager_factory": factory_manager.store.conninfo,
                "session_replicas": replicas[1].store.conninfo,
                "event_store": event_store.database.conninfo,
                "exai_db_clock": exai_db_clock.dsn,
                "crash_harness": crash_harness.dsn,
                "crash_harness.new_manager": harness_manager.store.conninfo,
            }
            # They work through it, and see one another's writes.
            await session_manager.ensure("through", data={"n": 1})
            assert (await replicas[0].get("through")).data == {"n": 1}
            await replicas[1].update_activity("through", request_duration_ms=5)
            assert (await session_store.fetch("through")).request_count == 1
            exai_db_clock.set("2027-03-15")
            (pid,) = await (await exai_rollback_conn.execute("SELECT pg_backend_pid()")).fetchone()
            info = exai_rollback_conn.info
            report(
                pooler=[exai_pooler.host, exai_pooler.port, str(exai_pooler.root), exai_pooler.mode],
                process=process(exai_pooler.pid),
                pytest_pid=os.getpid(),
                server=[exai_pg_server.host, exai_pg_server.port],
                where={name: where(dsn) for name, dsn in dsns.items()},
                through={name: through_a_pooler(dsn) for name, dsn in dsns.items()},
                rollback_conn=[info.host, info.port, pid != info.backend_pid],
                manager_name=session_manager.store.application_name,
                same_mode_is_the_runs=exai_pgbouncer(exai_pooler.mode) is exai_pooler,
                other_mode=exai_pgbouncer("session" if exai_pooler.mode == "transaction" else "transaction").mode,
                in_front=exai_pooler.server is exai_pg_server,
                clients=[[client["database"], client["application_name"]] for client in show(exai_pooler, "CLIENTS")],
                pools={pool["database"]: pool["pool_mode"] for pool in show(exai_pooler, "POOLS")},
            )


        def test_direct(exai_pooler, exai_pg_server, exai_dsn, exai_direct_dsn, report):
            report(
                exai_dsn=where(exai_dsn),
                direct=where(exai_direct_dsn),
                direct_through=through_a_pooler(exai_direct_dsn),
                server=[exai_pg_server.host, exai_pg_server.port],
                postmaster=process(exai_pg_server.pid),
            )
        """
    )
    args = [f"--exai-pooler={mode}", f"--exai-pg-basedir={basedir}"] + (["--exai-pg-tcp"] if tcp else [])
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=2)
    seen = facts(pytester)
    every, direct = seen["test_every_dsn"], seen["test_direct"]
    host, port, root, pooler_mode = every["pooler"]
    assert pooler_mode == mode
    assert Path(root).parent == basedir and Path(root).name.startswith("exai-pg-pooler-")
    assert host == ("127.0.0.1" if tcp else root)
    assert every["process"]["uid"] == server_uid()  # as the server's OS user (PgBouncer refuses root)
    assert every["process"]["ppid"] == every["pytest_pid"]  # the run's child, which dies with it
    for name, (dsn_host, dsn_port, _) in every["where"].items():
        assert (dsn_host, dsn_port) == (host, port), name
        assert every["through"][name] is True, name
    assert every["rollback_conn"] == [host, port, True]
    assert every["same_mode_is_the_runs"] is True and every["other_mode"] != mode
    assert every["in_front"] is True
    # The run's own clients are PgBouncer's, on the test's database ...
    assert [every["where"]["exai_dsn"][2], every["manager_name"]] in every["clients"]
    # ... which PgBouncer pools in the option's mode; nobody reached a template through it.
    assert every["pools"][every["where"]["exai_dsn"][2]] == mode
    assert not [name for name in every["pools"] if name.endswith("_template")]
    # exai_direct_dsn: the same database, straight to the server.
    assert direct["direct"] == [*direct["server"], direct["exai_dsn"][2]]
    assert direct["exai_dsn"][:2] == [host, port] and direct["direct_through"] is False
    if tcp:
        result.stdout.fnmatch_lines(
            [f"exai-sessions: tests connect through PgBouncer * in {mode} pool mode on 127.0.0.1 *"]
        )
    assert_nothing_left(basedir, every["process"], direct["postmaster"])


@pytest.mark.usefixtures("pgbouncer_binary")
@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_the_pool_mode_is_the_options(pytester: pytest.Pytester, mode: str) -> None:
    """In transaction mode a client holds a server connection only inside a transaction; in session mode for good."""
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        import psycopg

        from inner_helpers import show

        def links(pooler):
            return [bool(client["link"]) for client in show(pooler, "CLIENTS") if client["application_name"] == "probe"]

        def test_links(exai_pooler, exai_dsn, report):
            with psycopg.connect(exai_dsn, application_name="probe") as conn:
                conn.execute("SELECT 1")
                in_transaction = links(exai_pooler)
                conn.commit()
                between_transactions = links(exai_pooler)
            report(in_transaction=in_transaction, between_transactions=between_transactions)
        """
    )
    result = pytester.runpytest(f"--exai-pooler={mode}")
    result.assert_outcomes(passed=1)
    seen = facts(pytester)["test_links"]
    assert seen["in_transaction"] == [True]
    assert seen["between_transactions"] == [mode == "session"]


# managers and crashes through it

CRASH_TESTS = """
import psycopg
import pytest

from pytest_exai_sessions import PersistenceError, assert_full_recovery
from inner_helpers import process, through_a_pooler


async def workload(ctx):
    await ctx.ensure("child", data={"through": through_a_pooler(ctx.dsn)})
    for number in range(1_000_000):
        await ctx.update_activity("child", request_duration_ms=number % 7)


async def replica_workload(ctx):
    for step in range(ctx.params["steps"]):
        session_id = f"r{ctx.replica}-{step % 3}"
        if step < 3:
            await ctx.ensure(session_id)
        else:
            await ctx.update_activity(session_id, request_duration_ms=1)


@pytest.mark.asyncio
async def test_write_crash_and_read_back(session_manager, crash_harness):
    for number in range(20):
        await session_manager.ensure(f"s{number}", data={"n": number})
        await session_manager.update_activity(f"s{number}", request_duration_ms=number)
    before = crash_harness.snapshot(session_manager)
    recovered = await crash_harness.crash_and_restart(session_manager)
    assert_full_recovery(before, recovered)


@pytest.mark.asyncio
async def test_a_crash_ends_what_the_manager_held_and_no_other_replica_notices(
    session_replicas, crash_harness, exai_dsn
):
    crashing, other = await session_replicas(2)
    await crashing.ensure("locked")
    # A transaction of the crashing replica's, holding a row lock, as a process dies holding one.
    held = psycopg.connect(exai_dsn, application_name=crashing.store.application_name)
    held.execute("SELECT 1 FROM public.sessions WHERE session_id = 'locked' FOR UPDATE")
    await other.ensure("bystander")
    await crash_harness.abandon(crashing)
    with pytest.raises(psycopg.OperationalError):
        held.execute("SELECT 1")
    held.close()
    # The lock is gone with it, and the other replica's calls all go on.
    for number in range(20):
        assert (await other.update_activity("locked")).request_count == number + 1
        await other.update_activity("bystander")


@pytest.mark.asyncio
async def test_a_killed_child_through_the_pooler(crash_harness, report):
    crash = await crash_harness.run_and_kill(workload, kill_after_acks=30)
    crash.assert_ok()
    survivor = await crash_harness.new_manager()
    report(child_through=(await survivor.get("child")).data["through"])


@pytest.mark.asyncio
async def test_replicas_in_children(crash_harness):
    history = await crash_harness.run_replicas(replica_workload, replicas=2, kills=1, params={"steps": 12})
    history.assert_ok()


@pytest.mark.asyncio
async def test_the_pooler_restarts_under_a_running_manager(session_manager_factory, crash_harness, exai_pooler, report):
    manager = await session_manager_factory(store_options={"timeout": 0.5})
    await manager.ensure("s", data={"kept": True})
    first = process(exai_pooler.pid)
    dsn = exai_pooler.dsn()
    down = crash_harness.restart_pooler()
    second = process(exai_pooler.pid)
    assert (await manager.update_activity("s")).request_count == 1  # it connects again by itself
    crash_harness.kill_pooler()
    with pytest.raises(PersistenceError):
        await manager.update_activity("s")
    crash_harness.restart_pooler()
    assert (await manager.update_activity("s")).request_count == 2
    assert (await manager.get("s")).data == {"kept": True}
    report(first=first, second=second, down=down, same_dsn=exai_pooler.dsn() == dsn)


@pytest.mark.asyncio
async def test_the_pooler_stays_up_while_the_database_restarts(session_manager, crash_harness, exai_pooler, report):
    await session_manager.ensure("s")
    before = process(exai_pooler.pid)
    down = crash_harness.restart_database()
    assert (await session_manager.update_activity("s")).request_count == 1
    crash_harness.kill_database()
    crash_harness.restart_database()
    assert (await session_manager.update_activity("s")).request_count == 2
    report(before=before, after=process(exai_pooler.pid), down=down)
"""


@pytest.mark.usefixtures("pgbouncer_binary")
@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_managers_replicas_children_and_crashes_work_through_the_pooler(
    pytester: pytest.Pytester,
    basedir: Path,
    mode: PoolMode,
) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(CRASH_TESTS)
    result = pytester.runpytest_subprocess(f"--exai-pooler={mode}", f"--exai-pg-basedir={basedir}")
    result.assert_outcomes(passed=6)
    seen = facts(pytester)
    assert seen["test_a_killed_child_through_the_pooler"]["child_through"] is True
    restarted = seen["test_the_pooler_restarts_under_a_running_manager"]
    assert restarted["first"]["pid"] != restarted["second"]["pid"] and restarted["same_dsn"] is True
    assert restarted["down"] > 0
    database = seen["test_the_pooler_stays_up_while_the_database_restarts"]
    assert database["before"] == database["after"] and database["down"] > 0
    assert_nothing_left(basedir, restarted["second"])


def test_pooler_crash_helpers_skip_without_a_pooler(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.asyncio
        async def test_restart(crash_harness):
            crash_harness.restart_pooler()

        @pytest.mark.asyncio
        async def test_kill(crash_harness):
            crash_harness.kill_pooler()

        def test_no_pooler(exai_pooler, exai_dsn, exai_direct_dsn):
            assert exai_pooler is None and exai_direct_dsn == exai_dsn
        """
    )
    result = pytester.runpytest("-rs")
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines(
        ["SKIPPED ?2? *: pooler crash helpers need a pooler in the run: --exai-pooler=transaction or session *"]
    )


# other servers, xdist, cleanup


@pytest.mark.usefixtures("pgbouncer_binary")
def test_an_external_server_behind_the_pooler(
    pytester: pytest.Pytester, basedir: Path, exai_pg_server: PostgresServer
) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        import pytest

        from inner_helpers import process, through_a_pooler, where

        @pytest.mark.asyncio
        async def test_through(exai_pooler, exai_pg_server, exai_dsn, session_manager, report):
            await session_manager.ensure("s")
            report(external=exai_pg_server.external, through=through_a_pooler(exai_dsn), root=str(exai_pooler.root),
                   process=process(exai_pooler.pid), dbname=where(exai_dsn)[2])
        """
    )
    result = pytester.runpytest_subprocess(
        f"--exai-dsn={exai_pg_server.dsn()}", "--exai-pooler=session", f"--exai-pg-basedir={basedir}"
    )
    result.assert_outcomes(passed=1)
    seen = facts(pytester)["test_through"]
    assert seen["external"] is True and seen["through"] is True
    assert Path(seen["root"]).parent == basedir and seen["process"]["uid"] == server_uid()
    assert_nothing_left(basedir, seen["process"])
    with psycopg.connect(exai_pg_server.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (seen["dbname"],)).fetchone() is None


@pytest.mark.usefixtures("pgbouncer_binary")
def test_each_xdist_worker_has_its_own_pooler_in_front_of_its_own_server(
    pytester: pytest.Pytester, basedir: Path
) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        import os

        import pytest

        from inner_helpers import process, through_a_pooler

        @pytest.mark.parametrize("number", [pytest.param(n, marks=pytest.mark.xdist_group(n % 2)) for n in range(4)])
        def test_one(number, exai_pooler, exai_pg_server, exai_dsn, report):
            report(worker=os.environ["PYTEST_XDIST_WORKER"], pooler=str(exai_pooler.root),
                   server=str(exai_pg_server.root), in_front=exai_pooler.server is exai_pg_server,
                   through=through_a_pooler(exai_dsn), process=process(exai_pooler.pid))
        """
    )
    # Two groups of two tests: each worker gets one.
    result = pytester.runpytest_subprocess(
        "-n", "2", "--dist", "loadgroup", "--exai-pooler=transaction", f"--exai-pg-basedir={basedir}"
    )
    result.assert_outcomes(passed=4)
    by_worker: dict[str, set[tuple[str, str]]] = {}
    for seen in facts(pytester).values():
        assert seen["in_front"] is True and seen["through"] is True
        by_worker.setdefault(seen["worker"], set()).add((seen["pooler"], seen["server"]))
    poolers = [pair for pairs in by_worker.values() for pair in pairs]
    assert len(by_worker) == 2 and all(len(pairs) == 1 for pairs in by_worker.values())  # one a worker
    assert len({pooler for pooler, _ in poolers}) == len({server for _, server in poolers}) == len(by_worker)
    assert_nothing_left(basedir, *(seen["process"] for seen in facts(pytester).values()))


@pytest.mark.usefixtures("pgbouncer_binary")
def test_a_killed_inner_run_takes_its_pooler_with_it_and_the_next_run_removes_its_directory(
    pytester: pytest.Pytester, basedir: Path
) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(
        """
        import os
        import signal

        import psycopg

        from inner_helpers import process

        def test_dies_holding_a_pooler(exai_pooler, exai_pg_server, exai_dsn, report):
            client = psycopg.connect(exai_dsn)
            client.execute("SELECT 1")
            report(pooler=process(exai_pooler.pid), postmaster=process(exai_pg_server.pid), root=str(exai_pooler.root))
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    result = pytester.runpytest_subprocess("--exai-pooler=session", f"--exai-pg-basedir={basedir}")
    assert result.ret == -signal.SIGKILL
    seen = facts(pytester)["test_dies_holding_a_pooler"]
    killed = [Proc(p["pid"], p["ppid"], "", p["start"], ()) for p in (seen["pooler"], seen["postmaster"])]
    assert not wait_until_gone(killed), "PgBouncer or PostgreSQL outlived the killed pytest"
    assert not pgbouncers_in(basedir)
    assert Path(seen["root"]).is_dir()  # no teardown ran: its lock is free, its owner dead

    # The next run in that base directory removes it, even one that starts nothing.
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess(f"--exai-pg-basedir={basedir}")
    result.assert_outcomes(passed=1)
    assert left_in(basedir) == []
