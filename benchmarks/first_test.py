"""The first test of a run, as a developer in a TDD loop waits for it: ours against pytest-postgresql's.

Each measurement is a fresh ``pytest`` process on a one-test file. The figure is the setup
duration pytest reports for that test (what ``--durations`` shows: the server, the schema and
the first database, all session fixtures included), and the wall time of the whole process.
The variants take turns in every round, so load changes hit all alike.

pytest-postgresql's ``postgresql_proc`` runs ``pg_ctl initdb`` as the current user, which
PostgreSQL refuses to be root; so the comparison runs as an unprivileged user, in a virtualenv
of the system Python that user can read (the project's wheel, pytest-postgresql and
pytest-asyncio, installed from the package index). Ours is also measured as root (its
server then runs as that user), in the same virtualenv.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import per_test

PROJECT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
UNPRIVILEGED = "postgres"

RECORD_FIRST_SETUP = """
import json
import os

import pytest


@pytest.hookimpl
def pytest_runtest_logreport(report):
    if report.when == "setup":
        with open(os.environ["EXAI_BENCH_OUT"], "w") as out:
            json.dump({"setup": report.duration}, out)
"""

# The plugin's per-test database as a connection, as in per_test.py.
OURS = per_test.OURS

PYTEST_POSTGRESQL = """
import pytest


@pytest.fixture
def db(postgresql):
    yield postgresql
"""

TEST = "def test_first(db):\n    db.execute('SELECT 1')\n"


@dataclass
class Variant:
    """One way to run the suite: the fixture, the extra pytest arguments, and as whom."""

    fixture: str
    arguments: list[str]
    as_root: bool = False
    before_each: Callable[[], None] | None = None  # e.g. empty the cache: a truly cold run
    setups: list[float] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)  # the -v summary's setup line of each run


class Bench:
    """A private directory for the unprivileged user: its virtualenv, the suites, the caches."""

    def __init__(self) -> None:
        self.user = pwd.getpwnam(UNPRIVILEGED)
        self.root = Path(tempfile.mkdtemp(prefix="exai-bench-first-", dir="/var/tmp"))
        os.chmod(self.root, 0o755)
        os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        self.venv = self.root / "venv"
        self.env = {"PATH": "/usr/bin:/bin", "HOME": str(self.root), "LANG": "C.UTF-8"}

    def as_user(self, command: list[str], **options: object) -> subprocess.CompletedProcess[str]:
        settings: dict[str, object] = {"env": self.env, "cwd": self.root, **options}
        return subprocess.run(
            command,
            user=self.user.pw_uid,
            group=self.user.pw_gid,
            extra_groups=[],
            text=True,
            check=True,
            **settings,  # type: ignore[arg-type]
        )

    def install(self) -> None:
        wheels = self.root / "wheels"
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), str(PROJECT)],
            check=True,
        )
        os.chown(wheels, self.user.pw_uid, self.user.pw_gid)
        (wheel,) = wheels.glob("*.whl")
        self.as_user([SYSTEM_PYTHON, "-m", "venv", str(self.venv)])
        self.as_user(
            [str(self.venv / "bin" / "pip"), "install", "--quiet", str(wheel), "pytest-postgresql", "pytest-asyncio"],
            capture_output=True,
        )

    def versions(self) -> str:
        found = self.as_user(
            [
                str(self.venv / "bin" / "python"),
                "-c",
                "import platform, pytest, pytest_postgresql; "
                "print(platform.python_version(), pytest.__version__, pytest_postgresql.__version__)",
            ],
            capture_output=True,
        )
        python, pytest_version, pp_version = found.stdout.split()
        return f"Python {python} (system), pytest {pytest_version}, pytest-postgresql {pp_version}"

    def suite(self, name: str, fixture: str) -> Path:
        suite = self.root / name
        suite.mkdir()
        (suite / "conftest.py").write_text(RECORD_FIRST_SETUP + fixture)
        (suite / "test_first.py").write_text(TEST)
        (suite / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
        os.chown(suite, self.user.pw_uid, self.user.pw_gid)
        for path in suite.iterdir():
            os.chown(path, self.user.pw_uid, self.user.pw_gid)
        return suite

    def run(self, suite: Path, variant: Variant) -> None:
        out = suite / "out.json"
        command = [
            str(self.venv / "bin" / "python"),
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *variant.arguments,
        ]
        env = {**self.env, "EXAI_BENCH_OUT": str(out)}
        if variant.before_each is not None:
            variant.before_each()
        started = time.perf_counter()
        if variant.as_root:
            result = subprocess.run(command, cwd=suite, env=env, text=True, capture_output=True, check=True)
        else:
            result = self.as_user(command, cwd=suite, env=env, capture_output=True)
        variant.walls.append(time.perf_counter() - started)
        variant.setups.append(json.loads(out.read_text())["setup"])
        out.unlink()
        line = re.search(r"^exai-sessions setup: (.*)$", result.stdout, re.MULTILINE)
        if line:
            variant.phases.append(line.group(1))

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def median_phases(lines: list[str]) -> list[tuple[str, float, str]]:
    """Each phase's median over the runs' summary lines: (phase, ms, the first run's detail)."""
    values: dict[str, list[float]] = {}
    details: dict[str, str] = {}
    for line in lines:
        for name, ms, detail in re.findall(r"([a-z -]+?) (\d+) ms(?: \(([^)]*)\))?(?:, |$)", line):
            values.setdefault(name.strip(), []).append(float(ms))
            details.setdefault(name.strip(), detail)
    return [(name, statistics.median(ms), details[name]) for name, ms in values.items()]


def measure(rounds: int) -> tuple[str, dict[str, Variant]]:
    """Every variant once per round, interleaved; returns the environment line and the variants."""
    bench = Bench()
    tmpfs = Path(tempfile.mkdtemp(prefix="exai-bench-first-", dir="/dev/shm"))
    try:
        os.chmod(tmpfs, 0o755)
        os.chown(tmpfs, bench.user.pw_uid, bench.user.pw_gid)
        bench.install()
        pg_ctl = "/usr/lib/postgresql/15/bin/pg_ctl"
        ours = bench.suite("ours", OURS)
        theirs = bench.suite("theirs", PYTEST_POSTGRESQL)
        root_cache, user_cache, cold_cache = tmpfs / "root-cache", tmpfs / "user-cache", tmpfs / "cold-cache"

        def empty_cold_cache() -> None:
            # Run as root, the cache directory is root's; run as the user, the user's: remove either.
            shutil.rmtree(cold_cache, ignore_errors=True)

        no_ours = ["-p", "no:exai_sessions"]
        no_theirs = ["-p", "no:pytest_postgresql"]
        variants = {
            "pytest-postgresql (unprivileged, its default: data directory under /tmp, on disk)": Variant(
                PYTEST_POSTGRESQL, [*no_ours, f"--postgresql-exec={pg_ctl}"]
            ),
            "pytest-postgresql (unprivileged, --basetemp on tmpfs)": Variant(
                PYTEST_POSTGRESQL, [*no_ours, f"--postgresql-exec={pg_ctl}", f"--basetemp={tmpfs / 'basetemp'}"]
            ),
            "ours, cache warm (unprivileged)": Variant(
                OURS, [*no_theirs, "-vv", f"--exai-initdb-cache-dir={user_cache}"]
            ),
            "ours, cache cold (unprivileged)": Variant(
                OURS, [*no_theirs, "-vv", f"--exai-initdb-cache-dir={cold_cache}"], before_each=empty_cold_cache
            ),
            "ours, cache off (unprivileged)": Variant(OURS, [*no_theirs, "-vv", "--exai-no-initdb-cache"]),
            "ours, cache warm (root)": Variant(
                OURS, [*no_theirs, "-vv", f"--exai-initdb-cache-dir={root_cache}"], as_root=True
            ),
            "ours, cache cold (root)": Variant(
                OURS,
                [*no_theirs, "-vv", f"--exai-initdb-cache-dir={cold_cache}"],
                as_root=True,
                before_each=empty_cold_cache,
            ),
        }
        # One untimed run of each: the warm caches are built, the page cache holds the binaries.
        for variant in variants.values():
            bench.run(theirs if variant.fixture == PYTEST_POSTGRESQL else ours, Variant(**_copy(variant)))
        for _ in range(rounds):
            for variant in variants.values():
                bench.run(theirs if variant.fixture == PYTEST_POSTGRESQL else ours, variant)
        return bench.versions(), variants
    finally:
        shutil.rmtree(tmpfs, ignore_errors=True)  # also after a failure: caches and pytest-postgresql's basetemp
        bench.close()


def _copy(variant: Variant) -> dict[str, object]:
    return {
        "fixture": variant.fixture,
        "arguments": variant.arguments,
        "as_root": variant.as_root,
        "before_each": variant.before_each,
    }
