"""The core is what applications import in production: it pulls in no testing tool, server or plugin."""

import pkgutil
import subprocess
import sys

import pytest

import pytest_exai_sessions
from pytest_exai_sessions.testing.db_clock import DbClock as DbClockItself

TOOL_PACKAGES = ("testing", "server", "plugin")
CORE_MODULES = sorted(
    f"pytest_exai_sessions.{module.name}"
    for module in pkgutil.iter_modules(pytest_exai_sessions.__path__)
    # __main__ runs the CLI when imported; it is two lines over cli, which is here.
    if module.name not in (*TOOL_PACKAGES, "__main__")
)


def loaded_after_import(module):
    code = (
        f"import sys, {module}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pytest', '_pytest', 'hypothesis')"
        f" or m.startswith(tuple('pytest_exai_sessions.' + p for p in {TOOL_PACKAGES!r}))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return result.stdout.strip()


def test_the_core_is_found_by_rule_not_by_a_list():
    # Every module of the package that is not a tool package is core, so a new one is covered too.
    assert {"pytest_exai_sessions.manager", "pytest_exai_sessions.store", "pytest_exai_sessions.cli"} <= set(
        CORE_MODULES
    )
    assert not any(name.split(".")[1] in TOOL_PACKAGES for name in CORE_MODULES)


@pytest.mark.parametrize("module", ["pytest_exai_sessions", *CORE_MODULES])
def test_importing_the_core_imports_no_tool_and_no_test_framework(module):
    assert loaded_after_import(module) == "[]"


def test_the_testing_names_of_the_package_root_are_still_there_on_first_use():
    assert pytest_exai_sessions.DbClock is DbClockItself
    assert callable(pytest_exai_sessions.as_user) and callable(pytest_exai_sessions.assert_full_recovery)
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        pytest_exai_sessions.NoSuchName  # noqa: B018
