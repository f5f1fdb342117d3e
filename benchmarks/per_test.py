"""What a database fixture costs each test, measured the way users pay it: in a pytest run.

Each fixture under comparison hands the test a connection to a database of its own. A
generated suite of identical tests runs in a pytest subprocess; a hook records the setup
and teardown durations pytest reports for every test, and the median of their sum is the
fixture's per-test cost. The test bodies are the same for every fixture, so work a fixture
does in the background while a test runs counts only when the test has to wait for it.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

from pytest_exai_sessions.server.connection import PostgresServer

RECORD_COSTS = """
import json
import os

import pytest

_costs = {}
_bodies = {}


@pytest.hookimpl
def pytest_runtest_logreport(report):
    if report.when == "call":
        _bodies[report.nodeid] = report.duration
    else:
        _costs[report.nodeid] = _costs.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session):
    with open(os.environ["EXAI_BENCH_OUT"], "w") as out:
        json.dump({"costs": list(_costs.values()), "bodies": list(_bodies.values())}, out)
"""

# The plugin's per-test database, as a connection like pytest-postgresql's fixture hands out.
OURS = """
import psycopg


@pytest.fixture
def db(exai_dsn):
    with psycopg.connect(exai_dsn) as conn:
        yield conn
"""

# Creating the database and applying every migration in each test, on the plugin's server.
SCHEMA_PER_TEST = """
import secrets

import psycopg

from pytest_exai_sessions.testing.databases import ForcefulJanitor
from pytest_exai_sessions.schema import apply_to_dsn


@pytest.fixture
def db(exai_pg_server):
    server = exai_pg_server
    janitor = ForcefulJanitor(
        user=server.user, host=server.host, port=server.port, dbname=f"fresh_{secrets.token_hex(4)}"
    )
    janitor.init()
    apply_to_dsn(server.dsn(janitor.dbname))
    with psycopg.connect(server.dsn(janitor.dbname)) as conn:
        yield conn
    janitor.drop()
"""


def pytest_postgresql_fixture(server: PostgresServer) -> str:
    """pytest-postgresql's own `postgresql` fixture, on a server it did not start (root cannot run its)."""
    return f"""
from pytest_postgresql import factories

postgresql_on_bench_server = factories.postgresql_noproc(
    host={server.host!r}, port={server.port}, user={server.user!r}, dbname="bench"
)
db = factories.postgresql("postgresql_on_bench_server")
"""


BODIES = {
    "an empty test": "db.execute('SELECT 1')",
    # About 20 ms of work for the server, as a test that writes and reads some rows gives it.
    "a test with ~20 ms of queries": "db.execute('SELECT count(*) FROM generate_series(1, 200000)')",
}


@dataclass
class Measured:
    cost_ms: float  # median setup + teardown
    body_ms: float  # median call phase


def run_suite(fixture: str, body: str, tests: int, args: list[str] | None = None) -> Measured:
    """Run ``tests`` copies of ``body`` against ``fixture`` in a pytest subprocess."""
    suite = Path(tempfile.mkdtemp(prefix="exai-bench-suite-"))
    try:
        (suite / "conftest.py").write_text(RECORD_COSTS + fixture)
        (suite / "test_bench.py").write_text(
            "\n".join(f"def test_{n}(db):\n{textwrap.indent(body, '    ')}\n\n" for n in range(tests))
        )
        out = suite / "out.json"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
        command += ["-o", "asyncio_default_fixture_loop_scope=function", "--rootdir", str(suite), str(suite)]
        subprocess.run(
            [*command, *(args or [])],
            env={**os.environ, "EXAI_BENCH_OUT": str(out)},
            check=True,
            stdout=subprocess.DEVNULL,
            cwd=suite,
        )
        recorded = json.loads(out.read_text())
    finally:
        shutil.rmtree(suite, ignore_errors=True)
    return Measured(statistics.median(recorded["costs"]) * 1000, statistics.median(recorded["bodies"]) * 1000)


def compare(fixtures: dict[str, tuple[str, list[str]]], tests: int, rounds: int) -> dict[str, dict[str, Measured]]:
    """Per body and fixture, the median over ``rounds`` interleaved runs (load changes hit all alike)."""
    runs: dict[str, dict[str, list[Measured]]] = {body: {name: [] for name in fixtures} for body in BODIES}
    for _ in range(rounds):
        for body_name, body in BODIES.items():
            for name, (fixture, args) in fixtures.items():
                runs[body_name][name].append(run_suite(fixture, body, tests, args))
    return {
        body: {
            name: Measured(
                statistics.median(m.cost_ms for m in measured), statistics.median(m.body_ms for m in measured)
            )
            for name, measured in by_fixture.items()
        }
        for body, by_fixture in runs.items()
    }
