"""The records a workload writes, one per event, in the order they happened in its process.

An operation is an ``Invoked`` record, then at most one ``Completed`` with its outcome, as
Jepsen's clients record them:

- ``ok``: it took effect; ``state`` is the session the call returned;
- ``fail``: the store refused it and wrote nothing (``reason``: ``conflict``, ``not_found``);
- ``uncertain`` (Jepsen's ``info``): the call raised, and nobody knows whether it took effect.

An invocation that never completed was in flight when its process died: as uncertain.
``Ready``, ``FaultPointReached`` and ``Done`` tell the driver where the workload is.
Records cross a pipe as JSON lines (``encode``/``decode``); nothing else reads that format.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

Outcome = Literal["ok", "fail", "uncertain"]


@dataclass(frozen=True)
class Invoked:
    """An operation is about to start: what it is, and (``expect``) the fields it sets."""

    replica: int
    sequence: int
    session_id: str
    operation: str
    args: dict[str, Any] = field(default_factory=dict)
    expect: dict[str, Any] | None = None
    # time.monotonic(): CLOCK_MONOTONIC is one clock for every process on the host.
    at: float = 0.0


@dataclass(frozen=True)
class Completed:
    """The operation ``sequence`` of ``replica`` ended with ``outcome``."""

    replica: int
    sequence: int
    session_id: str
    outcome: Outcome
    state: dict[str, Any] | None = None
    reason: str | None = None
    # What else the call said: the version a request served, a conflict's current version.
    details: dict[str, Any] = field(default_factory=dict)
    at: float = 0.0


@dataclass(frozen=True)
class Ready:
    """The workload's manager is open; a fault "after N seconds" counts from here."""

    replica: int


@dataclass(frozen=True)
class FaultPointReached:
    """The workload waits at ``await ctx.fault_point(name)`` for the driver's word."""

    replica: int
    name: str


@dataclass(frozen=True)
class Done:
    """The workload returned."""

    replica: int


Record = Invoked | Completed | Ready | FaultPointReached | Done
_KINDS: dict[str, type[Record]] = {kind.__name__: kind for kind in (Invoked, Completed, Ready, FaultPointReached, Done)}


def encode(record: Record) -> bytes:
    """One JSON line."""
    fields = {"kind": type(record).__name__, **dataclasses.asdict(record)}
    return (json.dumps(fields, separators=(",", ":")) + "\n").encode()


def decode(line: bytes) -> Record:
    fields = json.loads(line)
    kind = _KINDS.get(fields.pop("kind", None))
    if kind is None:
        raise ValueError(f"not a workload record: {line[:200]!r}")
    return kind(**fields)
