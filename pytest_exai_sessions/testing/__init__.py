"""Tools a test uses around the core: crash helpers, the ledger and workloads of a killed
child, the recovery diff, the database clock, RLS helpers, per-test databases and the
stateful crash machine. They may import the core and the server, never the plugin."""

from .app_migrations import cache_inputs

__all__ = ["cache_inputs"]
