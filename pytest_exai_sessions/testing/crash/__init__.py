"""Crash tests in Jepsen's shape: a workload (the client), a fault (the nemesis), one checker.

- ``client.py``: ``WorkloadContext``, which records every operation as invoked, then
  ``ok``, ``fail`` or ``uncertain`` (``records.py``);
- ``child.py`` and ``driver.py``: a workload in this process, in one child process or in
  several replicas at once, read the same way, with the fault fired at a point of it;
- ``faults.py``: what breaks (the app's process, its backends, the database, the pooler,
  the database's power)
  and when (after N acknowledged operations, after a time, at a named fault point);
- ``history.py``, ``checker.py``, ``one_writer.py``, ``many_writers.py``: the verdict over
  the whole history against every row stored after recovery;
- ``harness.py``: ``CrashHarness``, the calls a test makes; ``workloads.py``: ready-made workloads.
"""

from .checker import CrashReport, Violation, check
from .client import WorkloadContext
from .faults import (
    DATABASE_CRASH_SIGNALS,
    AfterAcknowledged,
    AfterSeconds,
    AtFaultPoint,
    CutPower,
    EndBackends,
    FailOver,
    Fault,
    FaultAt,
    KillDatabase,
    KillPooler,
    KillProcess,
    PowerLossUnrecoverable,
)
from .harness import CrashHarness, DatabaseCrashUnsupported
from .history import History, Operation
from .records import Completed, Done, FaultPointReached, Invoked, Ready, Record, decode, encode

__all__ = [
    "DATABASE_CRASH_SIGNALS",
    "AfterAcknowledged",
    "AfterSeconds",
    "AtFaultPoint",
    "Completed",
    "CrashHarness",
    "CrashReport",
    "CutPower",
    "DatabaseCrashUnsupported",
    "Done",
    "EndBackends",
    "FailOver",
    "Fault",
    "FaultAt",
    "FaultPointReached",
    "History",
    "Invoked",
    "KillDatabase",
    "KillPooler",
    "KillProcess",
    "Operation",
    "PowerLossUnrecoverable",
    "Ready",
    "Record",
    "Violation",
    "WorkloadContext",
    "check",
    "decode",
    "encode",
]
