"""Tools a test uses around the core: crash tests (``crash/``), the recovery diff, the database
clock, RLS helpers, per-test databases, app migrations and the stateful crash machine. They
may import the core and the server, never the plugin."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app_migrations import cache_inputs

__all__ = ["cache_inputs"]


def __getattr__(name: str) -> Any:
    # Imported on first use: importing one tool must not import the others.
    if name == "cache_inputs":
        return import_module(f"{__name__}.app_migrations").cache_inputs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
