"""The app's own schema in the template (exai_migrations, exai_unified_schema), tried as a user would: inner runs."""

from __future__ import annotations

import json
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import psycopg
import pytest
from pg_leftovers import Leftovers, databases_besides, left_in

from pytest_exai_sessions import MigrationError, load_migrations
from pytest_exai_sessions.plugin.config import OPTIONS
from pytest_exai_sessions.server import PostgresServer
from pytest_exai_sessions.server.cache import CACHE_PREFIX
from pytest_exai_sessions.testing.app_migrations import apply_app_migrations, resolve
from pytest_exai_sessions.testing.databases import TestDatabases

INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"


@pytest.fixture(autouse=True)
def no_outer_options(exai_config: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner runs see none of the outer run's plugin environment (its config is read first)."""
    for option in OPTIONS:
        if option.env:
            monkeypatch.delenv(option.env, raising=False)


def ini(*lines: str) -> str:
    return INI + "".join(f"{line}\n" for line in lines)


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())


def run(pytester: pytest.Pytester, basedir: Path, *args: str) -> pytest.RunResult:
    """An inner run in a process of its own, on a private base directory that must be empty afterwards."""
    before = Leftovers(basedir)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--exai-pg-basedir={basedir}", *args)
    before.assert_clean()
    assert not [p for p in left_in(basedir) if not p.name.startswith(CACHE_PREFIX)], "clusters left behind"
    return result


SUPABASE_PROJECT = {
    "supabase/migrations/20251108120000_orders.sql": """
        -- Orders belong to a session of the unified schema.
        CREATE TABLE public.orders (
            order_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            session_id text NOT NULL REFERENCES public.sessions (session_id) ON DELETE CASCADE,
            total_cents integer NOT NULL CHECK (total_cents >= 0)
        );
    """,
    "supabase/migrations/20251109093000_order_notes.sql": """
        CREATE TABLE public.order_notes (
            order_id bigint NOT NULL REFERENCES public.orders (order_id),
            note text NOT NULL
        );
        COMMENT ON TABLE public.order_notes IS 'added a day later; the semicolon in ''this; string'' is no end';
    """,
    "supabase/migrations/README.md": "Not a migration: ignored.\n",
    "supabase/seed.sql": "this is not in the migrations directory and never runs\n",
}

USES_BOTH_TABLES = """
    import psycopg
    import pytest

    def test_the_template_has_both_tables(exai_dsn):
        with psycopg.connect(exai_dsn) as conn:
            tables = {t for (t,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )}
            ledger = conn.execute(
                "SELECT name, length(checksum) FROM exai_schema.applied_app_migrations ORDER BY applied_at, name"
            ).fetchall()
        assert {"sessions", "orders", "order_notes"} <= tables
        assert ledger == [
            ("supabase/migrations/20251108120000_orders.sql", 64),
            ("supabase/migrations/20251109093000_order_notes.sql", 64),
        ]

    @pytest.mark.asyncio
    async def test_session_manager_works_beside_them(exai_dsn, session_manager):
        await session_manager.ensure("cart-1")
        with psycopg.connect(exai_dsn) as conn:
            conn.execute("INSERT INTO public.orders (session_id, total_cents) VALUES ('cart-1', 1250)")
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            with psycopg.connect(exai_dsn) as conn:
                conn.execute("INSERT INTO public.orders (session_id, total_cents) VALUES ('nobody', 1)")
        assert (await session_manager.get("cart-1")) is not None
"""


def test_a_supabase_layout_lands_in_the_template_beside_the_sessions(pytester: pytest.Pytester, basedir: Path) -> None:
    pytester.makeini(ini("exai_migrations = supabase/migrations"))
    write(pytester.path, SUPABASE_PROJECT)
    pytester.makepyfile(USES_BOTH_TABLES)
    result = run(pytester, basedir)
    result.assert_outcomes(passed=2)
    latest = load_migrations()[-1].filename.split("_", 1)[0]
    result.stdout.fnmatch_lines([f"exai-sessions: *schema {latest}_* + 1 app migration entry (exai_migrations)*"])


def test_the_flag_and_the_environment_give_entries_too(pytester: pytest.Pytester, basedir: Path) -> None:
    write(pytester.path, SUPABASE_PROJECT)
    pytester.makeini(INI)
    pytester.makepyfile(USES_BOTH_TABLES)
    run(pytester, basedir, "--exai-migrations=supabase/migrations").assert_outcomes(passed=2)

    files = sorted(str(p.relative_to(pytester.path)) for p in (pytester.path / "supabase/migrations").glob("*.sql"))
    pytester._monkeypatch.setenv("EXAI_SESSIONS_MIGRATIONS", ",".join(files))
    run(pytester, basedir).assert_outcomes(passed=2)


BROKEN_ON_LINE_4 = """
    CREATE TABLE public.orders (order_id bigint PRIMARY KEY);

    -- the next statement names a column that does not exist
    CREATE INDEX orders_by_customer ON public.orders (customer_id);
    CREATE TABLE public.never_created (n int);
"""


def test_a_broken_statement_names_its_file_line_and_postgresqls_message(
    pytester: pytest.Pytester, basedir: Path
) -> None:
    pytester.makeini(ini("exai_migrations = db/migrations"))
    write(pytester.path, {"db/migrations/001_orders.sql": BROKEN_ON_LINE_4})
    pytester.makepyfile(
        """
        def test_needs_nothing():
            pass

        def test_needs_the_database(exai_dsn):
            pass

        def test_needs_it_too(exai_dsn):
            pass
        """
    )
    result = run(pytester, basedir)
    output = result.stdout.str()
    result.assert_outcomes(errors=1)  # the first test, though it needs no database: nothing ran
    result.stdout.fnmatch_lines(
        [
            "*the test template could not be built:",
            "db/migrations/001_orders.sql, line 4: CREATE INDEX orders_by_customer ON public.orders (customer_id);",
            '  error:  column "customer_id" does not exist',
            "  db/migrations/001_orders.sql ran in one transaction and was rolled back",
            "*Interrupted: the test template could not be built*",
        ]
    )
    assert output.count("ERROR at setup of") == 1  # one report, not one per test
    assert "ERROR at setup of test_needs_nothing" in output
    assert "Traceback" not in output and "pytest_exai_sessions/" not in output
    assert result.ret != 0

    # Fixed, the next run starts clean and passes.
    write(pytester.path, {"db/migrations/001_orders.sql": BROKEN_ON_LINE_4.replace("customer_id", "order_id")})
    run(pytester, basedir).assert_outcomes(passed=3)


def test_a_detail_and_hint_are_shown_and_a_later_line_of_a_long_statement_is_pointed_at(
    pytester: pytest.Pytester, basedir: Path
) -> None:
    pytester.makeini(ini("exai_migrations = schema.sql"))
    write(
        pytester.path,
        {
            "schema.sql": """
                CREATE TABLE public.plans (name text PRIMARY KEY);
                INSERT INTO public.plans VALUES ('free'), ('free');
            """
        },
    )
    pytester.makepyfile("def test_it(exai_dsn):\n    pass\n")
    result = run(pytester, basedir)
    result.stdout.fnmatch_lines(
        [
            "schema.sql, line 2: INSERT INTO public.plans VALUES ('free'), ('free');",
            '  error:  duplicate key value violates unique constraint "plans_pkey"',
            "  detail: Key (name)=(free) already exists.",
        ]
    )


def test_transaction_control_in_a_file_is_refused_with_its_line(pytester: pytest.Pytester, basedir: Path) -> None:
    pytester.makeini(ini("exai_migrations = schema.sql"))
    write(pytester.path, {"schema.sql": "BEGIN;\nCREATE TABLE public.t (n int);\nCOMMIT;\n"})
    pytester.makepyfile("def test_it(exai_dsn):\n    pass\n")
    run(pytester, basedir).stdout.fnmatch_lines(
        ["schema.sql, line 1: BEGIN is not allowed in a migration: each file runs in a transaction of its own*"]
    )


APP_SCHEMA_MODULE = """
    def create_tables(conn):
        conn.execute(
            "CREATE TABLE public.carts"
            " (cart_id text PRIMARY KEY, session_id text REFERENCES public.sessions (session_id))"
        )
        conn.execute("INSERT INTO public.carts VALUES ('template-cart', NULL)")

    def broken(conn):
        conn.execute("CREATE TABLE public.half_made (n int)")
        _helper()

    def _helper():
        raise RuntimeError("the app's migrator is broken")
"""


def test_a_callable_entry_gets_a_connection_to_the_template(pytester: pytest.Pytester, basedir: Path) -> None:
    pytester.makeini(ini("pythonpath = .", "exai_migrations =", "    app_schema:create_tables", "    extra.sql"))
    write(pytester.path, {"app_schema.py": APP_SCHEMA_MODULE, "extra.sql": "ALTER TABLE public.carts ADD note text;"})
    pytester.makepyfile(
        """
        import psycopg

        def test_what_the_callable_made_is_in_every_clone(exai_dsn):
            with psycopg.connect(exai_dsn) as conn:
                assert conn.execute("SELECT cart_id, note FROM public.carts").fetchall() == [("template-cart", None)]
                ledger = conn.execute("SELECT name FROM exai_schema.applied_app_migrations ORDER BY name")
                names = [name for (name,) in ledger]
            assert names == ["app_schema:create_tables", "extra.sql"]
        """
    )
    run(pytester, basedir).assert_outcomes(passed=1)


def test_a_callable_that_raises_shows_its_own_frames_only(pytester: pytest.Pytester, basedir: Path) -> None:
    pytester.makeini(ini("pythonpath = .", "exai_migrations = app_schema:broken"))
    write(pytester.path, {"app_schema.py": APP_SCHEMA_MODULE})
    pytester.makepyfile("def test_it(exai_dsn):\n    pass\n")
    result = run(pytester, basedir)
    result.stdout.fnmatch_lines(
        [
            "app_schema:broken raised RuntimeError and was rolled back",
            "Traceback (most recent call last):",
            '  File "*app_schema.py", line 10, in broken',
            '  File "*app_schema.py", line 13, in _helper',
            "RuntimeError: the app's migrator is broken",
        ]
    )
    assert "pytest_exai_sessions" not in result.stdout.str()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("missing/dir", "*--exai-migrations missing/dir: no such file or directory (relative paths resolve*"),
        ("notes.txt", "*--exai-migrations notes.txt: a migration file must end in .sql*"),
    ],
)
def test_an_entry_that_cannot_work_is_a_usage_error(
    entry: str, message: str, pytester: pytest.Pytester, basedir: Path
) -> None:
    pytester.makeini(INI)
    (pytester.path / "notes.txt").write_text("hello\n")
    pytester.makepyfile("def test_it(exai_dsn):\n    pass\n")
    result = run(pytester, basedir, f"--exai-migrations={entry}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_a_directory_file_without_a_number_is_refused(pytester: pytest.Pytester, basedir: Path) -> None:
    pytester.makeini(ini("exai_migrations = migrations"))
    write(pytester.path, {"migrations/001_a.sql": "SELECT 1;", "migrations/cleanup.sql": "SELECT 2;"})
    pytester.makepyfile("def test_it(exai_dsn):\n    pass\n")
    run(pytester, basedir).stdout.fnmatch_lines(
        ["migrations/cleanup.sql: a migration in a directory needs a numeric prefix that orders it*"]
    )


def test_two_files_with_one_number_are_refused(pytester: pytest.Pytester, basedir: Path) -> None:
    pytester.makeini(ini("exai_migrations = migrations"))
    write(pytester.path, {"migrations/001_a.sql": "SELECT 1;", "migrations/1_b.sql": "SELECT 2;"})
    pytester.makepyfile("def test_it(exai_dsn):\n    pass\n")
    run(pytester, basedir).stdout.fnmatch_lines(["migrations/* and *.sql share the number 1*"])


WITHOUT_UNIFIED = """
    import psycopg
    import pytest

    def test_only_the_apps_tables(exai_dsn):
        with psycopg.connect(exai_dsn) as conn:
            assert conn.execute("SELECT to_regclass('public.orders') IS NOT NULL").fetchone() == (True,)
            assert conn.execute("SELECT to_regclass('public.sessions')").fetchone() == (None,)
            assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'unified'").fetchone() == (0,)

    @pytest.mark.asyncio
    async def test_the_manager_says_what_is_missing(session_manager):
        pass

    @pytest.mark.asyncio
    async def test_the_store_too(session_store):
        pass
"""


def test_without_the_unified_schema_the_template_holds_only_the_apps(pytester: pytest.Pytester, basedir: Path) -> None:
    pytester.makeini(ini("exai_unified_schema = false", "exai_migrations = orders.sql"))
    write(pytester.path, {"orders.sql": "CREATE TABLE public.orders (order_id bigint PRIMARY KEY);"})
    pytester.makepyfile(WITHOUT_UNIFIED)
    result = run(pytester, basedir, "--exai-clock=2027-03-15")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*session_manager needs the table public.sessions of the unified schema, and this test's database has "
            'none the store can use (relation "public.sessions" does not exist)*exai_unified_schema*',
            "*session_store needs the table public.sessions*",
        ]
    )
    assert "Traceback" not in result.stdout.str()
    result.stdout.fnmatch_lines(["exai-sessions: *no unified schema + 1 app migration entry*"])


def test_the_flag_turns_the_unified_schema_off_too(pytester: pytest.Pytester, basedir: Path) -> None:
    pytester.makeini(INI)
    write(pytester.path, {"orders.sql": "CREATE TABLE public.orders (order_id bigint PRIMARY KEY);"})
    pytester.makepyfile(WITHOUT_UNIFIED)
    run(pytester, basedir, "--exai-no-unified-schema", "--exai-migrations=orders.sql").assert_outcomes(
        passed=1, errors=2
    )


# --exai-reuse: the cache follows the content

TABLES_ARE = """
    import json
    import os
    import psycopg

    def test_tables(exai_dsn):
        with psycopg.connect(exai_dsn) as conn:
            tables = sorted(t for (t,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'sessions'"
            ))
            columns = sorted(c for (c,) in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'orders'"
            ))
        assert {"tables": tables, "columns": columns} == json.loads(os.environ["EXPECTED"])
"""


def test_with_reuse_adding_changing_and_removing_a_file_rebuild_the_template(
    pytester: pytest.Pytester, basedir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini(ini("exai_migrations = migrations"))
    pytester.makepyfile(TABLES_ARE)
    migrations = pytester.path / "migrations"
    write(pytester.path, {"migrations/001_orders.sql": "CREATE TABLE public.orders (id int);"})

    def run_expecting(tables: list[str], columns: list[str]) -> Path:
        monkeypatch.setenv("EXPECTED", json.dumps({"tables": tables, "columns": columns}))
        run(pytester, basedir, "--exai-reuse", "--exai-clock=2027-03-15").assert_outcomes(passed=1)
        (cache,) = [p for p in basedir.iterdir() if p.is_dir() and p.name.startswith(CACHE_PREFIX)]
        return cache

    def ready_file(cache: Path) -> tuple[str, int]:
        return cache.name, (cache / "ready.json").stat().st_ino

    first = ready_file(run_expecting(["orders"], ["id"]))
    assert ready_file(run_expecting(["orders"], ["id"])) == first  # unchanged: reused

    write(pytester.path, {"migrations/002_carts.sql": "CREATE TABLE public.carts (id int);"})
    added = ready_file(run_expecting(["carts", "orders"], ["id"]))
    assert added[0] != first[0]

    write(pytester.path, {"migrations/001_orders.sql": "CREATE TABLE public.orders (id int, total int);"})
    changed = ready_file(run_expecting(["carts", "orders"], ["id", "total"]))
    assert changed[0] not in (first[0], added[0])

    (migrations / "002_carts.sql").unlink()
    removed = ready_file(run_expecting(["orders"], ["id", "total"]))
    assert removed[0] not in (first[0], added[0], changed[0])
    assert ready_file(run_expecting(["orders"], ["id", "total"])) == removed  # and reused again


def test_with_reuse_a_callables_module_and_declared_inputs_are_in_the_key(
    pytester: pytest.Pytester, basedir: Path
) -> None:
    pytester.makeini(ini("pythonpath = .", "exai_migrations = migrator:migrate"))
    write(
        pytester.path,
        {
            "migrator.py": """
                from pathlib import Path

                from pytest_exai_sessions.testing import cache_inputs

                @cache_inputs("versions")
                def migrate(conn):
                    for script in sorted(Path(__file__).with_name("versions").glob("*.sql")):
                        conn.execute(script.read_text())
            """,
            "versions/1.sql": "CREATE TABLE public.orders (id int)",
        },
    )
    pytester.makepyfile(
        """
        import psycopg

        def test_show(exai_dsn):
            with psycopg.connect(exai_dsn) as conn:
                print("TABLES", sorted(t for (t,) in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'sessions'")))
        """
    )

    def tables_and_cache() -> tuple[str, str]:
        result = run(pytester, basedir, "--exai-reuse", "--exai-clock=2027-03-15", "-s")
        result.assert_outcomes(passed=1)
        (line,) = [line[line.index("TABLES") :] for line in result.stdout.lines if "TABLES [" in line]
        (cache,) = [p.name for p in basedir.iterdir() if p.name.startswith(CACHE_PREFIX) and p.is_dir()]
        return line, cache

    first = tables_and_cache()
    assert first[0] == "TABLES ['orders']"
    assert tables_and_cache() == first
    write(pytester.path, {"versions/2.sql": "CREATE TABLE public.carts (id int)"})  # a declared input
    second = tables_and_cache()
    assert second[0] == "TABLES ['carts', 'orders']" and second[1] != first[1]
    (pytester.path / "migrator.py").write_text((pytester.path / "migrator.py").read_text() + "\n# edited\n")
    third = tables_and_cache()
    assert third[0] == second[0] and third[1] not in (first[1], second[1])  # the module's source


def test_help_documents_the_new_options(pytester: pytest.Pytester) -> None:
    pytester.makeini(INI)
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(
        [
            "*--exai-migrations=EXAI_MIGRATIONS*",
            "*--exai-no-unified-schema*",
            "*exai_migrations (linelist):*",
            "*exai_unified_schema (bool):*",
        ]
    )


def test_a_factorys_template_is_built_once_and_cached_by_its_own_key(pytester: pytest.Pytester, basedir: Path) -> None:
    pytester.makeini(INI)
    write(pytester.path, {"reports.sql": "CREATE TABLE public.reports (id int);"})
    pytester.makeconftest(
        """
        from pytest_exai_sessions.plugin import factories

        reports_dsn = factories.database(migrations=["reports.sql"])
        bare_dsn = factories.database(unified_schema=False, migrations=["reports.sql"])
        """
    )
    pytester.makepyfile(
        """
        import psycopg
        import pytest

        def tables(dsn):
            with psycopg.connect(dsn) as conn:
                return sorted(t for (t,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))

        @pytest.mark.parametrize("n", [1, 2])
        def test_three_templates(exai_dsn, reports_dsn, bare_dsn, n):
            assert tables(exai_dsn) == ["sessions"]
            assert tables(reports_dsn) == ["reports", "sessions"]
            assert tables(bare_dsn) == ["reports"]
            assert len({exai_dsn, reports_dsn, bare_dsn}) == 3
        """
    )

    def cached() -> tuple[list[str], int]:
        run(pytester, basedir, "--exai-reuse", "--exai-clock=2027-03-15").assert_outcomes(passed=2)
        (cache,) = [p for p in basedir.iterdir() if p.is_dir() and p.name.startswith(CACHE_PREFIX)]
        return json.loads((cache / "ready.json").read_text())["templates"], (cache / "ready.json").stat().st_ino

    templates, marker = cached()
    assert len(set(templates)) == 3  # the plugin's and each factory's, named by their keys
    assert cached() == (templates, marker)  # the next run builds none of them
    # Without --exai-reuse, each is built in the run (and dropped after it).
    run(pytester, basedir).assert_outcomes(passed=2)


def test_each_file_starts_from_a_fresh_session(empty_dsn: str, tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "m/001_app_schema.sql": "CREATE SCHEMA app;\nSET search_path = app;\nCREATE TABLE in_app (n int);\n",
            "m/002_after.sql": "CREATE TABLE after_it (n int);\n",
        },
    )
    steps = resolve(["m"], tmp_path)
    assert apply_app_migrations(empty_dsn, steps) == ["m/001_app_schema.sql", "m/002_after.sql"]
    assert apply_app_migrations(empty_dsn, steps) == []  # recorded: nothing to do again
    with psycopg.connect(empty_dsn) as conn:
        found = conn.execute("SELECT to_regclass('app.in_app') IS NOT NULL, to_regclass('public.after_it') IS NOT NULL")
        assert found.fetchone() == (True, True)  # the first file's SET did not reach the second

    write(tmp_path, {"m/002_after.sql": "CREATE TABLE after_it (n bigint);\n"})
    with pytest.raises(MigrationError, match=r"m/002_after\.sql was changed after it was applied"):
        apply_app_migrations(empty_dsn, resolve(["m"], tmp_path))


def test_every_step_runs_as_of_the_instant_given(empty_dsn: str, tmp_path: Path) -> None:
    write(
        tmp_path,
        {
            "m/001_first.sql": "CREATE TABLE seen AS SELECT 1 AS step, current_setting('unified.clock', true) AS t;\n",
            "m/002_second.sql": "INSERT INTO seen SELECT 2, current_setting('unified.clock', true);\n",
        },
    )
    as_of = datetime(2027, 3, 15, 12, tzinfo=UTC)
    assert apply_app_migrations(empty_dsn, resolve(["m"], tmp_path), as_of=as_of) == [
        "m/001_first.sql",
        "m/002_second.sql",
    ]
    with psycopg.connect(empty_dsn) as conn:
        seen = conn.execute("SELECT step, t::timestamptz FROM seen ORDER BY step").fetchall()
    assert seen == [(1, as_of), (2, as_of)]


def test_on_an_external_server_the_apps_templates_are_dropped_too(
    pytester: pytest.Pytester, exai_pg_server: PostgresServer, exai_databases: TestDatabases
) -> None:
    pytester.makeini(INI)
    write(pytester.path, {"orders.sql": "CREATE TABLE public.orders (id int);"})
    pytester.makeconftest(
        """
        from pytest_exai_sessions.plugin import factories

        bare_dsn = factories.database(unified_schema=False, migrations=["orders.sql"])
        """
    )
    pytester.makepyfile(
        """
        import psycopg

        def test_both(exai_dsn, bare_dsn):
            for dsn, expected in ((exai_dsn, (True, True)), (bare_dsn, (True, False))):
                with psycopg.connect(dsn) as conn:
                    found = conn.execute(
                        "SELECT to_regclass('public.orders') IS NOT NULL, to_regclass('public.sessions') IS NOT NULL"
                    )
                    assert found.fetchone() == expected
        """
    )
    before = databases_besides(exai_databases)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--exai-dsn={exai_pg_server.dsn()}", "--exai-migrations=orders.sql"
    )
    result.assert_outcomes(passed=1)
    assert databases_besides(exai_databases) == before  # both templates and both clones are gone
