"""The plugin under pytest-xdist: a server per worker, isolated databases, nothing left, also after a worker dies.

Inner runs are subprocesses (xdist starts its workers from there); each inner test that has a
database writes one JSON line of facts (worker, cluster directory, database, postmaster).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pg_leftovers import Leftovers, databases_besides, left_in, read_proc, wait_until_gone

from pytest_exai_sessions.plugin.config import OPTIONS
from pytest_exai_sessions.server import PostgresServer
from pytest_exai_sessions.testing.databases import TestDatabases

pytest.importorskip("xdist")

CONFTEST = """
import json
import os
import pathlib

import psycopg
import pytest

FACTS = pathlib.Path(__file__).with_name("facts.jsonl")


@pytest.fixture
def report(request, exai_pg_server, exai_dsn):
    def write(**extra):
        facts = {
            "test": request.node.name,
            "worker": os.environ.get("PYTEST_XDIST_WORKER"),
            "root": None if exai_pg_server.external else str(exai_pg_server.root),
            "postmaster": None if exai_pg_server.external else exai_pg_server.pid,
            "dbname": psycopg.conninfo.conninfo_to_dict(exai_dsn)["dbname"],
            **extra,
        }
        with FACTS.open("a") as f:  # one short line per write: appends do not interleave
            f.write(json.dumps(facts) + "\\n")

    return write
"""

# Every test writes the same session id: each must see only its own.
ISOLATION_TESTS = """
import pytest


@pytest.mark.parametrize("n", range(8))
@pytest.mark.asyncio
async def test_isolated(n, report, session_manager):
    assert await session_manager.list_ids() == []
    await session_manager.ensure("same-id-everywhere", data={"n": n})
    assert [s.data for s in session_manager.live_sessions().values()] == [{"n": n}]
    report()
"""


@pytest.fixture(autouse=True)
def no_plugin_environment(exai_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for option in OPTIONS:
        if option.env:
            monkeypatch.delenv(option.env, raising=False)


def facts(pytester: pytest.Pytester) -> list[dict[str, Any]]:
    path = pytester.path / "facts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_xdist(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    return pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", *args)


def test_each_worker_has_its_own_server_and_databases(pytester: pytest.Pytester, basedir: Path) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(ISOLATION_TESTS)
    before = Leftovers(basedir)

    result = run_xdist(pytester, f"--exai-pg-basedir={basedir}")

    result.assert_outcomes(passed=8)
    reported = facts(pytester)
    assert len(reported) == 8
    workers = {f["worker"] for f in reported}
    assert workers == {"gw0", "gw1"}
    roots = {w: {f["root"] for f in reported if f["worker"] == w} for w in workers}
    assert all(len(r) == 1 for r in roots.values())  # one server per worker for its whole run
    assert roots["gw0"] != roots["gw1"]
    assert all(Path(next(iter(r))).parent == basedir for r in roots.values())
    assert len({f["dbname"] for f in reported}) == 8
    before.assert_clean(roots=[Path(f["root"]) for f in reported])
    assert left_in(basedir) == []


def test_external_server_names_databases_per_worker(
    pytester: pytest.Pytester, exai_pg_server: PostgresServer, exai_databases: TestDatabases
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(ISOLATION_TESTS)
    databases_before = databases_besides(exai_databases)

    result = run_xdist(pytester, f"--exai-dsn={exai_pg_server.dsn()}")

    result.assert_outcomes(passed=8)
    reported = facts(pytester)
    assert {f["worker"] for f in reported} == {"gw0", "gw1"}
    for f in reported:
        assert f["dbname"].startswith(f"exai_{f['worker']}_"), f
    assert databases_besides(exai_databases) == databases_before


def test_a_worker_killed_mid_run_leaves_no_server_and_no_directory(pytester: pytest.Pytester, basedir: Path) -> None:
    """SIGKILL a worker while it holds a server: its postmaster dies with it, and its directory,
    which no teardown removed, is removed by the controller at the end of the run."""
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        ISOLATION_TESTS
        + """

import os
import signal


def test_zz_dies_holding_a_server(report, exai_pg_server):
    report(killed=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""
    )
    before = Leftovers(basedir)

    result = run_xdist(pytester, f"--exai-pg-basedir={basedir}")

    result.stdout.fnmatch_lines(["*worker 'gw*' crashed while running*test_zz_dies_holding_a_server*"])
    result.assert_outcomes(passed=8, failed=1)
    reported = facts(pytester)
    (killed,) = [f for f in reported if f.get("killed")]
    postmaster = read_proc(killed["postmaster"])
    if postmaster is not None and "-D" in postmaster.argv:
        assert not wait_until_gone([postmaster]), "the killed worker's postmaster outlived it"
    roots = {Path(f["root"]) for f in reported}
    assert len(roots) >= 2  # the killed worker's server, and at least one other
    before.assert_clean(roots=sorted(roots))
    assert left_in(basedir) == [], "the killed worker's cluster directory was left behind"
