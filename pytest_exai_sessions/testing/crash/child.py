"""A workload's own process: ``python -m pytest_exai_sessions.testing.crash.child SPEC``.

The driver starts it, reads its records from a pipe and, at the fault, kills it.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

from ...clock import SYSTEM_CLOCK, ManualClock
from ...manager import SessionManager
from .client import PipeSink, Workload, WorkloadContext
from .importable import import_object
from .records import Done, Ready


@dataclass(frozen=True)
class ChildSpec:
    """What a child needs to run one replica of a workload; crosses the process boundary as JSON."""

    dsn: str
    workload: str
    manager_class: str
    options: dict[str, Any]
    # The parent's test clock as it stood at the start (None: the real time).
    clock: str | None
    params: dict[str, Any]
    record_fd: int
    replica: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))


async def _run(spec: ChildSpec, sink: PipeSink) -> None:
    workload: Workload = import_object(spec.workload)
    manager_class: type[SessionManager] = import_object(spec.manager_class)
    clock = ManualClock(spec.clock) if spec.clock else SYSTEM_CLOCK
    manager = await manager_class.open(spec.dsn, clock=clock, **spec.options)
    # Starting Python and importing takes a varying part of a second that says nothing
    # about the workload: a fault "after N seconds" counts from here.
    sink.write(Ready(spec.replica))
    await workload(WorkloadContext(manager, sink, spec.params, spec.dsn, replica=spec.replica))
    sink.write(Done(spec.replica))
    await manager.aclose()


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    spec = ChildSpec(**json.loads(arguments[0]))
    asyncio.run(_run(spec, PipeSink(spec.record_fd)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
