"""The power-loss fixtures: a crash harness on a server whose disk can lose power."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from ..server import find_bindir, server_os_user
from ..server.power_loss import PowerLossPostgres, power_loss_unsupported
from ..testing.crash import CrashHarness
from ..testing.power_loss_servers import PowerLossServers, Settings
from .config import ExaiConfig
from .harnesses import harness_on
from .servers import initdb_cache_of
from .templates import main_schema

POWER_LOSS_MARKER = "exai_power_loss"


def marker_settings(request: pytest.FixtureRequest) -> dict[str, str]:
    """The server settings of this test's ``@pytest.mark.exai_power_loss(settings={...})`` marks (closest wins)."""
    settings: dict[str, str] = {}
    for mark in reversed(list(request.node.iter_markers(POWER_LOSS_MARKER))):
        unknown = sorted(set(mark.kwargs) - {"settings"})
        if mark.args or unknown:
            pytest.fail(
                f"@pytest.mark.{POWER_LOSS_MARKER} takes only settings={{name: value}}, got {mark.args!r} {unknown!r}",
                pytrace=False,
            )
        given = mark.kwargs.get("settings", {})
        if not isinstance(given, dict) or not all(isinstance(k, str) for k in given):
            pytest.fail(
                f"@pytest.mark.{POWER_LOSS_MARKER}(settings=...) needs a dict of setting names, got {given!r}",
                pytrace=False,
            )
        settings.update({name: str(value) for name, value in given.items()})
    return settings


@pytest.fixture(scope="session")
def exai_power_loss_servers(exai_config: ExaiConfig) -> Iterator[PowerLossServers]:
    """The run's power-loss servers, one per set of settings, started when a test first needs one."""
    reason = power_loss_unsupported()
    if reason is not None:
        pytest.skip(f"no power-loss server here: {reason}")

    def make_server(settings: Settings) -> PowerLossPostgres:
        return PowerLossPostgres(
            find_bindir(exai_config.pg_bin),
            basedir=exai_config.pg_basedir,
            os_user=server_os_user(exai_config.pg_os_user),
            listen_tcp=exai_config.pg_tcp,
            settings=settings,
            startup_timeout=exai_config.pg_startup_timeout,
            initdb_cache=initdb_cache_of(exai_config),
        )

    servers = PowerLossServers(
        make_server, main_schema(exai_config).resolve(exai_config.rootdir), clock_start=exai_config.clock
    )
    try:
        yield servers
    finally:
        servers.close()


@pytest_asyncio.fixture
async def power_loss_harness(
    exai_power_loss_servers: PowerLossServers, exai_config: ExaiConfig, request: pytest.FixtureRequest
) -> AsyncIterator[CrashHarness]:
    """A CrashHarness on a fresh database of a server whose disk can lose power: cut_power(), run_and_cut_power().

    The server runs production durability (fsync, full_page_writes, synchronous_commit on),
    then the run's --exai-pg-setting values, then those of @pytest.mark.exai_power_loss(settings={...}).
    Skips where no disk can lose power (not Linux, not root, no loop device), saying why.
    """
    settings = {**exai_config.pg_settings, **marker_settings(request)}
    async with harness_on(
        lambda: exai_power_loss_servers.database(settings),
        exai_power_loss_servers.release,
        clock_start=exai_config.clock,
        what="the power-loss server",
    ) as harness:
        yield harness


def register_marker(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{POWER_LOSS_MARKER}(settings={{...}}): server settings of this test's power_loss_harness, over production "
        "durability and the run's --exai-pg-setting values, e.g. settings={'synchronous_commit': 'off'}",
    )
