"""Moved to ``pytest_exai_sessions.testing.crash.client``; this name keeps working."""

from .crash.client import Acknowledgement, Workload, WorkloadContext

__all__ = ["Acknowledgement", "Workload", "WorkloadContext"]
