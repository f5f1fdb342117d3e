"""The built wheel carries sql/ and applies the schema from a fresh virtual environment."""

import subprocess
import sys
import zipfile
from pathlib import Path

import psycopg
import pytest

REPO = Path(__file__).resolve().parent.parent


def run(*command, cwd):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.slow
def test_a_wheel_installed_in_a_fresh_venv_applies_the_schema(tmp_path, empty_dsn):
    # build makes the sdist first and the wheel from it, so both must carry sql/.
    run(sys.executable, "-m", "build", "--outdir", str(tmp_path / "dist"), str(REPO), cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    packaged_sql = sorted(n.rsplit("/", 1)[1] for n in names if n.startswith("pytest_exai_sessions/sql/"))
    assert packaged_sql == sorted(p.name for p in (REPO / "sql").glob("*.sql"))
    assert "[pytest11]" in entry_points and "pytest_exai_sessions.plugin" in entry_points

    venv = tmp_path / "fresh"
    run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path)
    run(str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel), cwd=tmp_path)
    script = (
        "import sys, pytest_exai_sessions.schema as schema\n"
        "print(schema.migrations_dir())\n"
        "print(len(schema.apply_to_dsn(sys.argv[1])))\n"
    )
    # Run outside the checkout so that nothing can be imported from it.
    output = run(str(venv / "bin" / "python"), "-c", script, empty_dsn, cwd=tmp_path).splitlines()

    assert output[0].startswith(str(venv)), "sql/ must be found inside the installed package"
    assert int(output[1]) == len(packaged_sql)
    with psycopg.connect(empty_dsn) as conn:
        tables = conn.execute(
            "SELECT to_regclass('public.sessions') IS NOT NULL, to_regclass('unified.event_metric_events') IS NOT NULL"
        ).fetchone()
    assert tables == (True, True)
