"""The plugin loads where the POSIX-only modules do not exist (Windows), and says what to use instead.

Each test runs Python in a subprocess with pwd, grp, fcntl and resource blocked: importing
one raises ModuleNotFoundError, as it does on Windows.
"""

import subprocess
import sys
import textwrap

import pytest

BLOCKED = ("pwd", "grp", "fcntl", "resource")
BLOCK_THEM = textwrap.dedent(
    f"""
    import sys

    class Blocked:
        def find_spec(self, name, path=None, target=None):
            if name in {BLOCKED!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked, as on Windows)", name=name)
            return None

    for name in {BLOCKED!r}:
        sys.modules.pop(name, None)
    sys.meta_path.insert(0, Blocked())
    """
)


def run_blocked(code, cwd):
    return subprocess.run(
        [sys.executable, "-c", BLOCK_THEM + textwrap.dedent(code)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_blocker_blocks(tmp_path):
    result = run_blocked("import pwd", tmp_path)
    assert result.returncode != 0
    assert "blocked, as on Windows" in result.stderr


def test_the_core_and_the_plugin_import_without_them(tmp_path):
    result = run_blocked(
        """
        import pytest_exai_sessions, pytest_exai_sessions.compat, pytest_exai_sessions.cli, pytest_exai_sessions.plugin
        from pytest_exai_sessions import SessionManager
        print(sorted(name for name in ("pwd", "grp", "fcntl", "resource") if name in sys.modules))
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_pytest_help_runs_without_them(tmp_path):
    result = run_blocked("import pytest; sys.exit(pytest.main(['--help']))", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--exai-dsn" in result.stdout


TESTS = """
import pytest

def test_needs_nothing():
    pass

@pytest.mark.asyncio
async def test_needs_a_manager(session_manager):
    await session_manager.ensure("here")
"""


def test_without_a_server_the_tests_that_need_one_say_to_use_exai_dsn(tmp_path):
    (tmp_path / "test_app.py").write_text(TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    result = run_blocked("import pytest; sys.exit(pytest.main(['-p', 'no:cacheprovider', '-rE']))", tmp_path)
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout + result.stderr
    assert "1 passed, 1 error" in result.stdout
    assert "no temporary server on this platform (it needs POSIX): use --exai-dsn" in result.stdout  # the header
    assert "the temporary PostgreSQL server needs a POSIX system" in result.stdout
    assert "point the plugin at an existing server instead: --exai-dsn" in result.stdout
    assert "Traceback" not in result.stdout


def test_with_an_existing_server_everything_works_without_them(tmp_path, exai_pg_server):
    (tmp_path / "test_app.py").write_text(TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    dsn = exai_pg_server.dsn()
    result = run_blocked(
        f"import pytest; sys.exit(pytest.main(['-p', 'no:cacheprovider', {'--exai-dsn=' + dsn!r}]))", tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
