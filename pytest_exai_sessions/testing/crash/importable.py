"""Naming a module-level object so that a child process can import it."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(path: str) -> Any:
    """``package.module:attribute`` (or ``package.module.attribute``) to the object it names."""
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"{path!r} is not an importable name like 'package.module:function'")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def object_path(target: Any) -> str:
    """The importable name of a module-level function or class, for the child to import."""
    if isinstance(target, str):
        return target
    module, qualname = getattr(target, "__module__", None), getattr(target, "__qualname__", "")
    if not module or "<" in qualname or module == "__main__":
        raise ValueError(f"{target!r} must be a module-level function or class that the child process can import")
    return f"{module}:{qualname}"


def resolve(target: Any) -> Any:
    """``target`` itself, or the object its importable name names."""
    return import_object(target) if isinstance(target, str) else target
