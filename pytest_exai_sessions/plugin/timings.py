"""What the first test waited for, phase by phase: the terminal summary shows it with ``-v``.

Each phase is recorded once per process, the first time it happens: the cluster (initdb,
or a copy from a cache), the server's start, the pooler, the schema (the first template)
and the first clone. Under xdist every worker has its own server; each worker's phases
reach the controller through ``workeroutput`` and are listed per worker.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

_TIMINGS_KEY = pytest.StashKey["SetupTimings"]()
_WORKERS_KEY = pytest.StashKey[dict[str, list[list[Any]]]]()
_WORKEROUTPUT_KEY = "exai_setup_timings"


class SetupTimings:
    """The phases of this process's setup, in the order they happened: (name, seconds, detail)."""

    def __init__(self) -> None:
        self.phases: list[tuple[str, float, str | None]] = []

    def recorded(self, phase: str) -> bool:
        return any(name == phase for name, _, _ in self.phases)

    def record(self, phase: str, seconds: float, detail: str | None = None) -> None:
        if not self.recorded(phase):
            self.phases.append((phase, seconds, detail))

    @contextmanager
    def measure(self, phase: str, detail: str | None = None) -> Iterator[None]:
        """Record the block's duration as ``phase``, unless that phase has been recorded before."""
        if self.recorded(phase):
            yield
            return
        started = time.perf_counter()
        yield
        self.record(phase, time.perf_counter() - started, detail)

    def line(self) -> str:
        return ", ".join(
            f"{name} {seconds * 1000:.0f} ms" + (f" ({detail})" if detail else "")
            for name, seconds, detail in self.phases
        )


def timings_of(config: pytest.Config) -> SetupTimings:
    if _TIMINGS_KEY not in config.stash:
        config.stash[_TIMINGS_KEY] = SetupTimings()
    return config.stash[_TIMINGS_KEY]


def send_to_controller(config: pytest.Config) -> None:
    """In an xdist worker: hand this worker's phases to the controller."""
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None and _TIMINGS_KEY in config.stash:
        workeroutput[_WORKEROUTPUT_KEY] = [list(phase) for phase in config.stash[_TIMINGS_KEY].phases]


def received_from_worker(config: pytest.Config, worker: str, workeroutput: dict[str, Any]) -> None:
    """In the xdist controller: keep a worker's phases for the summary."""
    phases = workeroutput.get(_WORKEROUTPUT_KEY)
    if phases:
        config.stash.setdefault(_WORKERS_KEY, {})[worker] = phases


def summary_lines(config: pytest.Config) -> list[str]:
    """The summary's lines: this process's phases, or each worker's."""
    lines = []
    if _TIMINGS_KEY in config.stash and config.stash[_TIMINGS_KEY].phases:
        lines.append(f"exai-sessions setup: {config.stash[_TIMINGS_KEY].line()}")
    for worker, phases in sorted(config.stash.get(_WORKERS_KEY, {}).items()):
        timings = SetupTimings()
        for name, seconds, detail in phases:
            timings.record(name, seconds, detail)
        lines.append(f"exai-sessions setup [{worker}]: {timings.line()}")
    return lines
