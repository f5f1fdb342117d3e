"""Moved to ``pytest_exai_sessions.testing.crash.workloads``; this name keeps working."""

from .crash.workloads import mixed_workload, replica_workload

__all__ = ["mixed_workload", "replica_workload"]
