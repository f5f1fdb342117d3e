"""The migrations and the runner, against a real server: apply, re-apply, fail, race."""

import shutil
import threading
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pytest_exai_sessions import MigrationError, apply_migrations, load_migrations, migration_status
from pytest_exai_sessions.schema import migrations_dir


def connect(dsn):
    return psycopg.connect(dsn, autocommit=True)


def copy_migrations(tmp_path):
    target = tmp_path / "sql"
    shutil.copytree(Path(str(migrations_dir())), target)
    return target


def test_the_runner_applies_everything_once_and_then_nothing(empty_dsn):
    with connect(empty_dsn) as conn:
        first = apply_migrations(conn)
        second = apply_migrations(conn)
        statuses = migration_status(conn)
        ledger = conn.execute(
            "SELECT version, name, checksum FROM exai_schema.applied_migrations ORDER BY 1"
        ).fetchall()

    assert [m.version for m in first] == [m.version for m in load_migrations()]
    assert second == []
    assert all(status.applied_at is not None for status in statuses)
    assert ledger == [(m.version, m.name, m.checksum) for m in load_migrations()]


def test_every_file_is_idempotent_on_its_own(empty_dsn):
    """Run without the ledger, twice: what a DBA pasting the files would do."""
    with connect(empty_dsn) as conn:
        for _ in range(2):
            for migration in load_migrations():
                with conn.transaction():
                    conn.execute(migration.sql.encode())
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM pg_policies WHERE tablename IN ('sessions', 'event_metric_events')),"
            " (SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.sessions'::regclass AND NOT tgisinternal)"
        ).fetchone()
    assert counts == (4, 1)


def test_a_changed_applied_migration_is_an_error_naming_the_file(empty_dsn, tmp_path):
    directory = copy_migrations(tmp_path)
    with connect(empty_dsn) as conn:
        apply_migrations(conn, load_migrations(directory))
        edited = sorted(directory.glob("*.sql"))[1]
        edited.write_text(edited.read_text() + "\n-- an innocent edit\n")

        with pytest.raises(MigrationError, match=rf"{edited.name} was changed after it was applied"):
            apply_migrations(conn, load_migrations(directory))
        with pytest.raises(MigrationError, match=edited.name):
            migration_status(conn, load_migrations(directory))


def test_a_failing_migration_names_file_and_line_and_leaves_nothing(empty_dsn, tmp_path):
    directory = copy_migrations(tmp_path)
    (directory / "900_broken.sql").write_text(
        "CREATE TABLE public.half_done (id int);\n\nSELECT * FROM public.no_such_table;\n"
    )
    with connect(empty_dsn) as conn:
        with pytest.raises(MigrationError) as failure:
            apply_migrations(conn, load_migrations(directory))
        message = str(failure.value)
        assert message.splitlines() == [
            "900_broken.sql, line 3: SELECT * FROM public.no_such_table;",
            '  error:  relation "public.no_such_table" does not exist',
            "  900_broken.sql ran in one transaction and was rolled back",
        ]
        # The good migrations before it stay applied; the broken one left nothing.
        assert conn.execute("SELECT to_regclass('public.half_done')").fetchone() == (None,)
        assert conn.execute("SELECT max(version) FROM exai_schema.applied_migrations").fetchone() == (
            load_migrations()[-1].version,
        )


def test_a_migration_file_reaches_the_server_as_one_query(empty_dsn, tmp_path):
    script = (
        "CREATE TABLE public.seen (query text);\n"
        "INSERT INTO public.seen SELECT current_query();\n"
        "-- a comment between statements\n"
        "SELECT 2;\n"
    )
    directory = tmp_path / "sql"
    directory.mkdir()
    (directory / "001_one_query.sql").write_text(script)
    with connect(empty_dsn) as conn:
        apply_migrations(conn, load_migrations(directory))
        assert conn.execute("SELECT query FROM public.seen").fetchall() == [(script,)]


def test_a_file_that_fails_only_as_one_query_is_rolled_back_without_a_line(empty_dsn, tmp_path):
    """When running it statement by statement cannot repeat the failure, the file's own error is reported."""
    directory = tmp_path / "sql"
    directory.mkdir()
    (directory / "001_whole.sql").write_text(
        "CREATE TABLE public.half_done (id int);\n"
        "DO $$ BEGIN IF current_query() LIKE 'CREATE%' THEN RAISE EXCEPTION 'sent as one query'; END IF; END $$;\n"
    )
    with connect(empty_dsn) as conn:
        with pytest.raises(MigrationError) as failure:
            apply_migrations(conn, load_migrations(directory))
        assert str(failure.value).splitlines() == [
            "001_whole.sql: sent as one query",
            "  it failed as one query but not statement by statement, so no line can be named",
            "  001_whole.sql ran in one transaction and was rolled back",
        ]
        assert isinstance(failure.value.__cause__, psycopg.errors.RaiseException)
        assert conn.execute("SELECT to_regclass('public.half_done')").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM exai_schema.applied_migrations").fetchone() == (0,)


def test_bad_file_names_and_duplicate_versions_are_refused(tmp_path):
    (tmp_path / "1_short.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"1_short\.sql: migration files must be named NNN_lower_snake_name\.sql"):
        load_migrations(tmp_path)
    (tmp_path / "1_short.sql").unlink()
    (tmp_path / "010_a.sql").write_text("SELECT 1;")
    (tmp_path / "010_b.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match="share version 10"):
        load_migrations(tmp_path)


@pytest.mark.parametrize("path", ["direct", "through PgBouncer in transaction mode"])
def test_concurrent_runners_serialise_and_both_succeed(empty_dsn, path, request):
    dsn = empty_dsn
    if path != "direct":
        pooler = request.getfixturevalue("exai_pgbouncer")("transaction")
        dsn = pooler.dsn(psycopg.conninfo.conninfo_to_dict(empty_dsn)["dbname"])
    start = threading.Barrier(4)
    results, errors = [], []

    def migrate():
        try:
            with connect(dsn) as conn:
                start.wait()
                results.append([m.version for m in apply_migrations(conn)])
        except (MigrationError, psycopg.Error) as error:  # collected and asserted below
            errors.append(error)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    # Each file's transaction takes the lock (none is held between them, so that the runner
    # works through a pooler in transaction mode): the runners may share the files out,
    # each applied by one of them, each runner's in order.
    assert sorted(version for done in results for version in done) == [m.version for m in load_migrations()]
    assert all(done == sorted(done) for done in results)
    with connect(empty_dsn) as conn:
        ledger = conn.execute("SELECT version FROM exai_schema.applied_migrations ORDER BY 1").fetchall()
    assert ledger == [(m.version,) for m in load_migrations()]


def test_an_existing_supabase_auth_schema_is_left_alone(empty_dsn):
    with connect(empty_dsn) as conn:
        conn.execute(
            "CREATE SCHEMA auth;"
            " CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE"
            " AS $$ SELECT '99999999-9999-9999-9999-999999999999'::uuid $$;"
        )
        apply_migrations(conn)
        assert conn.execute("SELECT auth.uid()::text").fetchone() == ("99999999-9999-9999-9999-999999999999",)


def test_metadata_defaults_only_where_the_tables_exist(empty_dsn):
    with connect(empty_dsn) as conn:
        conn.execute("CREATE TABLE public.conversations (id int, metadata jsonb)")
        apply_migrations(conn)
        defaults = conn.execute(
            "SELECT column_default FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name = 'conversations' AND column_name = 'metadata'"
        ).fetchone()
        assert defaults[0] is not None and "schema_version" in defaults[0]
        assert conn.execute("SELECT to_regclass('public.messages')").fetchone() == (None,)


class TestUnifiedEvents:
    """The partitioned events table and its functions, in a per-test database with the schema."""

    def insert_event(self, conn, timestamp, **fields):
        columns = {"event_type": "login", "event_category": "auth", "source_system": "api", **fields}
        query = sql.SQL(
            "INSERT INTO unified.event_metric_events ({names}, event_timestamp) VALUES ({marks}, %s)"
            " RETURNING tableoid::regclass::text, event_metadata"
        ).format(
            names=sql.SQL(", ").join(map(sql.Identifier, columns)),
            marks=sql.SQL(", ").join(sql.Placeholder() for _ in columns),
        )
        return conn.execute(query, (*columns.values(), timestamp)).fetchone()

    def test_eight_distinct_secondary_indexes(self, exai_dsn):
        with connect(exai_dsn) as conn:
            indexes = conn.execute(
                "SELECT indexdef FROM pg_indexes WHERE schemaname = 'unified'"
                " AND tablename = 'event_metric_events' AND indexname NOT LIKE '%pkey'"
            ).fetchall()
        definitions = [d.split(" USING ", 1)[1] for (d,) in indexes]
        assert len(definitions) == 8
        assert len(set(definitions)) == 8

    def test_any_timestamp_is_accepted_and_routed_to_its_month(self, exai_dsn, exai_db_clock):
        with connect(exai_dsn) as conn:
            # The template has the partitions of the months around the clock's start.
            now_partition, _ = self.insert_event(conn, exai_db_clock.now())
            old, _ = self.insert_event(conn, "2019-03-04 05:06:07+00")
            future, _ = self.insert_event(conn, "2035-01-01 00:00:00+00")
            conn.execute("SET TIME ZONE 'America/New_York'")
            # 23:30 in New York on 30 Nov is already December in UTC: months are UTC months.
            conn.execute("SELECT unified.create_monthly_partition('2030-12-15 00:00+00')")
            december, _ = self.insert_event(conn, "2030-11-30 23:30:00-05")
        assert now_partition.startswith("unified.event_metric_events_y")
        assert old == future == "unified.event_metric_events_default"
        assert december == "unified.event_metric_events_y2030m12"

    def test_creating_a_partition_moves_rows_out_of_the_default_partition(self, exai_dsn):
        with connect(exai_dsn) as conn:
            self.insert_event(conn, "2031-06-10 12:00:00+00")
            self.insert_event(conn, "2031-06-20 12:00:00+00")
            name = conn.execute("SELECT unified.create_monthly_partition('2031-06-01+00')").fetchone()[0]
            again = conn.execute("SELECT unified.create_monthly_partition('2031-06-30+00')").fetchone()[0]
            placed = conn.execute(
                "SELECT tableoid::regclass::text, count(*) FROM unified.event_metric_events"
                " WHERE event_timestamp >= '2031-06-01+00' AND event_timestamp < '2031-07-01+00' GROUP BY 1"
            ).fetchall()
        assert name == again == "event_metric_events_y2031m06"
        assert placed == [("unified.event_metric_events_y2031m06", 2)]

    # Retention, partition creation under a moved clock, the views' refresh and updated_at
    # are in test_clock.py, where the database's clock is under the test's control.

    def test_the_trigger_standardises_metadata(self, exai_dsn):
        Jsonb = psycopg.types.json.Jsonb
        with connect(exai_dsn) as conn:
            _, metadata = self.insert_event(conn, "now()", event_metadata=Jsonb({"k": 1}))
            _, overridden = self.insert_event(conn, "now()", event_metadata=Jsonb({"source_system": "mine"}))
            # Explicit NULLs become {} before NOT NULL is checked, and metadata gets the standard keys.
            row = conn.execute(
                "INSERT INTO unified.event_metric_events"
                " (event_type, event_category, source_system, event_data, event_metrics, event_metadata)"
                " VALUES ('t', 'c', 'worker', NULL, NULL, NULL) RETURNING id, event_data, event_metrics, event_metadata"
            ).fetchone()
            # On UPDATE too.
            updated = conn.execute(
                "UPDATE unified.event_metric_events SET event_data = NULL, event_metrics = NULL,"
                " event_metadata = NULL WHERE id = %s RETURNING event_data, event_metrics, event_metadata",
                (row[0],),
            ).fetchone()
            refused = {}
            for column in ("event_data", "event_metrics", "event_metadata"):
                for value in ([1, 2], "text", 3):
                    with pytest.raises(psycopg.errors.CheckViolation) as failure:
                        self.insert_event(conn, "now()", **{column: Jsonb(value)})
                    refused[(column, str(value))] = failure.value.diag.message_primary
            count = conn.execute("SELECT count(*) FROM unified.event_metric_events").fetchone()

        standard = {"schema_version": 1, "source_system": "worker"}
        assert metadata == {"schema_version": 1, "source_system": "api", "k": 1}
        assert overridden == {"schema_version": 1, "source_system": "mine"}  # the caller's keys win
        assert row[1:] == ({}, {}, standard)
        assert updated == ({}, {}, standard)
        assert refused[("event_data", "[1, 2]")] == "event_data must be a JSON object, got a JSON array"
        assert refused[("event_metrics", "text")] == "event_metrics must be a JSON object, got a JSON string"
        assert refused[("event_metadata", "3")] == "event_metadata must be a JSON object, got a JSON number"
        assert len(refused) == 9
        assert count == (3,)


class TestRowLevelSecurity:
    """The policies are restrictive: anon nothing, authenticated its own rows, service_role all."""

    ALICE = "11111111-1111-1111-1111-111111111111"
    BOB = "22222222-2222-2222-2222-222222222222"

    @pytest.fixture
    def conn(self, exai_dsn):
        with connect(exai_dsn) as conn:
            conn.execute(
                "INSERT INTO public.sessions (session_id, user_id) VALUES ('a', %s), ('b', %s)",
                (self.ALICE, self.BOB),
            )
            yield conn

    def visible_as(self, conn, role, sub=None):
        with conn.transaction():
            conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
            if sub:
                conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (f'{{"sub": "{sub}"}}',))
            return sorted(r[0] for r in conn.execute("SELECT session_id FROM public.sessions").fetchall())

    def test_who_sees_which_sessions(self, conn):
        assert self.visible_as(conn, "anon") == []
        assert self.visible_as(conn, "authenticated", self.ALICE) == ["a"]
        assert self.visible_as(conn, "authenticated", self.BOB) == ["b"]
        assert self.visible_as(conn, "authenticated") == []
        assert self.visible_as(conn, "service_role") == ["a", "b"]
        # Once the transaction is over the claims are gone, and reading them does not fail.
        assert conn.execute("SELECT auth.uid(), auth.jwt()").fetchone() == (None, None)

    def test_api_roles_cannot_write(self, conn):
        for role in ("anon", "authenticated"):
            with (
                pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"),
                conn.transaction(),
            ):
                conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
                conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (f'{{"sub": "{self.ALICE}"}}',))
                conn.execute("INSERT INTO public.sessions (session_id, user_id) VALUES ('x', %s)", (self.ALICE,))
