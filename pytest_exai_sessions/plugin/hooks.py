"""The plugin's hooks: options, the marker, the report header, snapshot diffs in asserts, cleanup."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from ..errors import ExaiSessionsError
from ..manager import SessionManager
from ..models import Session
from ..server import default_basedir, find_bindir, server_os_user
from ..server.cluster import sweep_stale_clusters, temporary_server_supported
from ..server.pooler import find_pgbouncer
from ..testing.recovery import compare_snapshots
from . import failover, power_loss
from .config import ExaiConfig, add_options, read_config
from .servers import describe_durability, describe_pooler, describe_setup
from .templates import DECLARED
from .timings import received_from_worker, send_to_controller, summary_lines

MARKER = "exai_sessions"
# The keyword options of SessionManager that a test may set through the marker.
MANAGER_OPTIONS = tuple(
    name
    for name, parameter in inspect.signature(SessionManager.__init__).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("close_store", "clock")
)
_CONFIG_KEY = pytest.StashKey[ExaiConfig]()


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(**options): options of the session_manager and session_manager_factory managers of this test, "
        f"e.g. @pytest.mark.{MARKER}(session_timeout_secs=1, max_concurrent_sessions=5); "
        f"known options: {', '.join(MANAGER_OPTIONS)}",
    )
    power_loss.register_marker(config)
    failover.register_marker(config)
    if config.getoption("help", False) or config.getoption("version", False):
        return
    # Bad options fail the run once, here, as a usage error, instead of once per test.
    exai = read_config(config, dict(os.environ))
    config.stash[_CONFIG_KEY] = exai
    _validate(exai)


def _validate(exai: ExaiConfig) -> None:
    """Check what can be checked without starting or connecting to anything."""
    try:
        if exai.pooler is not None:
            if not temporary_server_supported():
                raise pytest.UsageError("--exai-pooler needs a POSIX system (PgBouncer runs as this run's child)")
            find_pgbouncer()  # asked for and missing: the run's one report of it, before any test
        if exai.dsn:
            try:
                conninfo_to_dict(exai.dsn)
            except psycopg.ProgrammingError as error:
                raise pytest.UsageError(f"--exai-dsn is not a valid PostgreSQL DSN: {error}") from None
            return
        if exai.pg_bin:
            find_bindir(exai.pg_bin)  # an explicit choice that does not exist is a usage error
        if temporary_server_supported():  # elsewhere the tests that need the server say why
            server_os_user(exai.pg_os_user)
        if exai.pg_basedir is not None and not exai.pg_basedir.is_dir():
            raise pytest.UsageError(f"--exai-pg-basedir={exai.pg_basedir} is not an existing directory")
    except ExaiSessionsError as error:
        raise pytest.UsageError(str(error)) from None


def pytest_unconfigure(config: pytest.Config) -> None:
    DECLARED.clear()  # the factories of the next run in this process (pytester's inline runs) declare their own


def config_of(config: pytest.Config) -> ExaiConfig:
    """The options of this run, read once."""
    if _CONFIG_KEY not in config.stash:
        config.stash[_CONFIG_KEY] = read_config(config, dict(os.environ))
    return config.stash[_CONFIG_KEY]


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Lines on the server the tests will get, the pooler in front of it and, with ``--exai-dsn``, its durability.

    Starts nothing; only the durability line connects.
    """
    try:
        exai = config_of(config)
        # xdist workers build a header too, which nobody sees: only the controller connects for it.
        durability = None if hasattr(config, "workerinput") else describe_durability(exai)
        lines = (describe_setup(exai), describe_pooler(exai), durability)
        return [line for line in lines if line is not None]
    except pytest.UsageError:
        return []


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """In the main process (the xdist controller too): remove clusters and poolers whose process died.

    Covers an xdist worker killed mid-run: its postmaster and PgBouncer died with it, their
    directories stay until here. Only directories whose owner is gone are removed; see
    sweep_stale_clusters. With --exai-dsn there are none of ours, unless a pooler ran.
    """
    if hasattr(session.config, "workerinput"):
        send_to_controller(session.config)
        return
    exai = session.config.stash.get(_CONFIG_KEY, None)
    if exai is None or (exai.dsn and exai.pooler is None):
        return
    basedir = exai.pg_basedir or default_basedir()
    sweep_stale_clusters(basedir)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """pytest-xdist's: a worker finished; keep the setup phases it reports."""
    received_from_worker(node.config, node.gateway.id, getattr(node, "workeroutput", {}))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """With -v: what the first test's setup waited for (cluster, start, schema, first clone)."""
    if config.getoption("verbose") < 1:
        return
    lines = summary_lines(config)
    if lines:
        terminalreporter.section("exai-sessions setup")
        for line in lines:
            terminalreporter.write_line(line)


def pytest_assertrepr_compare(config: pytest.Config, op: str, left: object, right: object) -> list[str] | None:
    """``assert before == after`` on two snapshots explains itself as assert_full_recovery does."""
    if op != "==" or not (_is_snapshot(left) and _is_snapshot(right)):
        return None
    assert isinstance(left, Mapping) and isinstance(right, Mapping)
    if not left and not right:
        return None
    diff = compare_snapshots(left, right)
    if not diff:
        return None
    return [f"session snapshots differ: {diff.summary()}", *diff.lines()]


def _is_snapshot(value: object) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(key, str) and isinstance(item, Session) for key, item in value.items()
    )
