"""Splitting SQL scripts into statements as psql does: the lexer's rules, positions, and the packaged migrations."""

import re

import psycopg
import pytest

from pytest_exai_sessions.schema import load_migrations
from pytest_exai_sessions.sql_script import Statement, split_statements


def texts(script):
    return [statement.text for statement in split_statements(script)]


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param("SELECT 'a;b', 'it''s; fine';", id="single-quoted string, doubled quote"),
        pytest.param("SELECT E'\\'; still the string';", id="E-string, backslash escapes the quote"),
        pytest.param("SELECT e'\\\\', e'x\\';y';", id="e-string, escaped backslash then escaped quote"),
        pytest.param("SELECT E'it''s;';", id="E-string, doubled quote"),
        pytest.param("SELECT U&'d\\0061t;a' UESCAPE '\\';", id="U&-string, backslash is not an escape"),
        pytest.param('SELECT 1 AS "a;""b";', id="quoted identifier, doubled quote"),
        pytest.param("SELECT $$a;b$$;", id="dollar quote"),
        pytest.param("SELECT $body$ ; $$ ; $other$ ; $body$;", id="tagged dollar quote, other tags inside"),
        pytest.param("SELECT $_x1$ ; $_x1$;", id="tag with underscore and digit"),
        pytest.param("SELECT $Tag$ ; $tag$ ; $Tag$;", id="tags are case-sensitive"),
        pytest.param("SELECT 1 -- a comment; still\n + 1;", id="line comment"),
        pytest.param("SELECT /* ; */ 1;", id="block comment"),
        pytest.param("SELECT /* outer /* inner; */ still; comment */ 1;", id="block comments nest"),
        pytest.param(
            "CREATE RULE r AS ON INSERT TO t DO ALSO (INSERT INTO u VALUES (1); INSERT INTO v VALUES (2));",
            id="parentheses, as psql (a multi-action rule)",
        ),
        pytest.param(
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END;",
            id="SQL-standard function body",
        ),
        pytest.param(
            "create or replace procedure p() language sql begin atomic insert into t values (1); end;",
            id="procedure, lower case, OR REPLACE",
        ),
        pytest.param(
            "CREATE FUNCTION f(x int) RETURNS int LANGUAGE sql BEGIN ATOMIC"
            " SELECT CASE WHEN x > 0 THEN 1 ELSE 2 END; SELECT CASE x WHEN 1 THEN 1 END; END;",
            id="CASE ... END inside the body",
        ),
        pytest.param(
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT (CASE WHEN true THEN 1 END); END;",
            id="CASE ... END inside parentheses",
        ),
    ],
)
def test_a_semicolon_inside_does_not_end_the_statement(statement):
    assert texts(f"{statement}\nSELECT 'next';") == [statement, "SELECT 'next';"]


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        pytest.param("SELECT 1;SELECT 2;", ["SELECT 1;", "SELECT 2;"], id="two statements"),
        pytest.param("SELECT 1; SELECT 2", ["SELECT 1;", "SELECT 2"], id="last without ';'"),
        pytest.param("SELECT 1; SELECT 2\n", ["SELECT 1;", "SELECT 2\n"], id="last without ';' ends the script"),
        pytest.param("SELECT '\\'; SELECT 2;", ["SELECT '\\';", "SELECT 2;"], id="plain string, no backslash escape"),
        pytest.param("SELECT xe'\\'; SELECT 2;", ["SELECT xe'\\';", "SELECT 2;"], id="E only as a word of its own"),
        pytest.param("SELECT $1; SELECT $2;", ["SELECT $1;", "SELECT $2;"], id="parameters are no dollar quotes"),
        pytest.param("SELECT $1$; SELECT 2$;", ["SELECT $1$;", "SELECT 2$;"], id="a tag cannot start with a digit"),
        pytest.param("SELECT a$b$c, x$$; SELECT 2;", ["SELECT a$b$c, x$$;", "SELECT 2;"], id="'$' inside a name"),
        pytest.param("SELECT (1; SELECT 2);", ["SELECT (1; SELECT 2);"], id="unbalanced parentheses swallow"),
        pytest.param("SELECT 1); SELECT 2;", ["SELECT 1);", "SELECT 2;"], id="a stray ')' opens nothing"),
        pytest.param(
            "BEGIN; SELECT CASE WHEN true THEN 1 END; END;",
            ["BEGIN;", "SELECT CASE WHEN true THEN 1 END;", "END;"],
            id="BEGIN outside CREATE FUNCTION",
        ),
        pytest.param(
            "CREATE TABLE t (a int); BEGIN; END;",
            ["CREATE TABLE t (a int);", "BEGIN;", "END;"],
            id="CREATE TABLE is no function",
        ),
        pytest.param(
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ BEGIN; $$; BEGIN; COMMIT;",
            ["CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ BEGIN; $$;", "BEGIN;", "COMMIT;"],
            id="BEGIN in a dollar-quoted body counts for nothing",
        ),
        pytest.param(
            "CREATE FUNCTION f(x int) RETURNS int LANGUAGE sql RETURN CASE WHEN x > 0 THEN 1 END; SELECT 2;",
            ["CREATE FUNCTION f(x int) RETURNS int LANGUAGE sql RETURN CASE WHEN x > 0 THEN 1 END;", "SELECT 2;"],
            id="CASE outside a BEGIN block opens nothing",
        ),
        pytest.param(
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql RETURN CASE WHEN true THEN 1; SELECT 2;",
            ["CREATE FUNCTION f() RETURNS int LANGUAGE sql RETURN CASE WHEN true THEN 1;", "SELECT 2;"],
            id="CASE outside a BEGIN block opens nothing, even without its END",
        ),
        pytest.param(
            "CREATE FUNCTION f(begin int) RETURNS int LANGUAGE sql RETURN 1; SELECT 2;",
            ["CREATE FUNCTION f(begin int) RETURNS int LANGUAGE sql RETURN 1;", "SELECT 2;"],
            id="BEGIN inside parentheses opens nothing",
        ),
        pytest.param(
            'CREATE FUNCTION "begin"() RETURNS int LANGUAGE sql RETURN 1; SELECT 2;',
            ['CREATE FUNCTION "begin"() RETURNS int LANGUAGE sql RETURN 1;', "SELECT 2;"],
            id="a quoted BEGIN is a name",
        ),
        pytest.param(
            "CREATE OR REPLACE VIEW v AS SELECT 1; BEGIN; END;",
            ["CREATE OR REPLACE VIEW v AS SELECT 1;", "BEGIN;", "END;"],
            id="CREATE OR REPLACE of something else",
        ),
        pytest.param("SELECT 1;;", ["SELECT 1;", ";"], id="an empty statement is kept, as psql sends it"),
    ],
)
def test_split(script, expected):
    assert texts(script) == expected


@pytest.mark.parametrize(
    "script",
    ["", "  \n\t\n", "-- only a comment", "-- one\n/* two\n /* nested */ */\n  -- three\n"],
)
def test_blanks_and_comments_alone_are_no_statement(script):
    assert split_statements(script) == []


def test_comments_around_a_statement_stay_out_of_it_and_inside_stay_in():
    script = "-- before\n/* before */ SELECT 1 /* inside; */ -- inside\n + 1; -- after\n/* after */\n"
    assert texts(script) == ["SELECT 1 /* inside; */ -- inside\n + 1;"]


@pytest.mark.parametrize(
    ("script", "rest"),
    [
        pytest.param("SELECT 1; SELECT 'open; SELECT 2;", "SELECT 'open; SELECT 2;", id="string"),
        pytest.param("SELECT 1; SELECT E'\\'; SELECT 2;", "SELECT E'\\'; SELECT 2;", id="E-string"),
        pytest.param('SELECT 1; SELECT "open; SELECT 2;', 'SELECT "open; SELECT 2;', id="quoted identifier"),
        pytest.param("SELECT 1; SELECT $x$ open; SELECT 2;", "SELECT $x$ open; SELECT 2;", id="dollar quote"),
        pytest.param("SELECT 1; SELECT /* open; SELECT 2;", "SELECT /* open; SELECT 2;", id="comment in a statement"),
        pytest.param("SELECT 1; /* open; SELECT 2;\n", "/* open; SELECT 2;\n", id="comment between statements"),
        pytest.param("SELECT 1; /* /* */ SELECT 2;", "/* /* */ SELECT 2;", id="comment closed only once"),
    ],
)
def test_something_left_open_makes_the_rest_the_last_statement(script, rest):
    assert texts(script) == ["SELECT 1;", rest]


def test_offsets_and_lines():
    script = (
        "-- 001_example.sql\n"  # line 1
        "-- a comment line\n"
        "\n"
        "CREATE TABLE t (a int);  SELECT 1;\n"  # line 4
        "/* a block\n"
        "   comment */   SELECT\n"  # line 6
        "    2; -- trailing\n"
        "  SELECT 'a\nb';\n"  # line 8
        "SELECT $$\n;\n$$;"  # line 10
    )
    statements = split_statements(script)

    assert [(s.text, s.line) for s in statements] == [
        ("CREATE TABLE t (a int);", 4),
        ("SELECT 1;", 4),
        ("SELECT\n    2;", 6),
        ("SELECT 'a\nb';", 8),
        ("SELECT $$\n;\n$$;", 10),
    ]
    for statement in statements:
        assert script[statement.offset : statement.offset + len(statement.text)] == statement.text
        assert statement.line == script.count("\n", 0, statement.offset) + 1
    assert [s.offset for s in statements] == [script.index(s.text) for s in statements]


def test_offsets_count_characters_not_bytes():
    script = "SELECT 'é€😀';\nSELECT 2;"
    assert split_statements(script)[1] == Statement("SELECT 2;", 14, 2)


def test_line_at_maps_a_position_in_the_statement_to_a_script_line():
    statement = split_statements("\n\n-- three\nSELECT 1,\n  2,\n\n  x;")[0]
    assert (statement.text, statement.line) == ("SELECT 1,\n  2,\n\n  x;", 4)
    text = statement.text

    assert statement.line_at(1) == 4  # the S
    assert statement.line_at(text.index("\n") + 1) == 4  # the newline itself is on its line
    assert statement.line_at(text.index("2") + 1) == 5
    assert statement.line_at(text.index("x") + 1) == 7
    assert statement.line_at(len(text)) == 7
    assert statement.line_at(len(text) + 1) == 7  # "at end of input"
    assert statement.line_at(0) == 4


def residue(script, statements):
    """The script with every statement cut out: what no statement covers."""
    pieces, cursor = [], 0
    for statement in statements:
        assert statement.offset >= cursor, "statements overlap or are out of order"
        pieces.append(script[cursor : statement.offset])
        cursor = statement.offset + len(statement.text)
    return "".join([*pieces, script[cursor:]])


# Independent of the lexer: blanks, line comments and (non-nested, as in the migrations) block comments.
_ONLY_BLANKS_AND_COMMENTS = re.compile(r"(?:\s|--[^\n]*|/\*.*?\*/)*", re.DOTALL)


def test_packaged_migrations_split_completely_and_apply_statement_by_statement(empty_dsn):
    migrations = load_migrations()
    assert migrations

    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        for migration in migrations:
            statements = split_statements(migration.sql)
            assert statements, migration.filename
            for statement in statements:
                assert migration.sql[statement.offset :].startswith(statement.text)
                assert statement.line == migration.sql.count("\n", 0, statement.offset) + 1
                assert statement.text.endswith(";"), f"{migration.filename}:{statement.line}"
            left = residue(migration.sql, statements)
            assert _ONLY_BLANKS_AND_COMMENTS.fullmatch(left), f"{migration.filename}: uncovered {left!r}"

            with conn.transaction():
                for statement in statements:
                    try:
                        conn.execute(statement.text.encode())
                    except psycopg.Error as error:
                        position = int(error.diag.statement_position or 1)
                        pytest.fail(f"{migration.filename}:{statement.line_at(position)}: {error}")

        last = conn.execute("SELECT to_regprocedure('unified.reserve_session_slot(bigint, timestamptz, timestamptz)')")
        assert last.fetchone() != (None,)


def test_line_at_agrees_with_the_servers_error_position(empty_dsn):
    script = "SELECT 1;\n\n-- é€ before the error, in characters\nSELECT 'é€😀',\n  1 +\n  FROM nowhere;\n"
    failing = split_statements(script)[1]

    with psycopg.connect(empty_dsn, autocommit=True) as conn, pytest.raises(psycopg.errors.SyntaxError) as caught:
        conn.execute(failing.text.encode())

    assert failing.line_at(int(caught.value.diag.statement_position)) == 6
