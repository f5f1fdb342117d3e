"""A vanilla PostgreSQL made to look like a Supabase database, for tests.

Built from what Supabase documents about its databases (see the README, "Testing against a
Supabase-like database"), not from its code:

- the superuser is ``supabase_admin``, which nobody else gets; ``postgres``, the role
  projects connect as, is ``NOSUPERUSER`` with ``LOGIN CREATEDB CREATEROLE BYPASSRLS`` and
  is granted ``anon``, ``authenticated`` and ``service_role`` (so it can test RLS by
  switching to them);
- the API roles ``anon``, ``authenticated`` and ``service_role`` (``BYPASSRLS``) cannot
  log in; PostgREST logs in as ``authenticator`` (``LOGIN NOINHERIT``), which is granted
  the three and switches to one of them for each request;
- the schema ``auth`` belongs to ``supabase_auth_admin``, with ``auth.uid()``,
  ``auth.role()`` and ``auth.jwt()`` reading the per-claim settings
  (``request.jwt.claim.sub`` / ``.role``, older PostgREST) first and then
  ``request.jwt.claims`` (current PostgREST); the API roles and ``postgres`` may use them;
- the database belongs to ``supabase_admin``; ``postgres`` may create schemas in it and
  objects in ``public``. New tables there are not granted to the API roles (Supabase's
  default since 2026) unless ``data_api_default_privileges=True``: then what ``postgres``
  creates in ``public`` is, by default privileges, as projects could opt in to (and older
  projects had).

``make_supabase_like(conn)`` applies this through a superuser connection (cluster-wide
roles, then the connected database); ``SupabaseLikeServer`` starts a throwaway server
initdb'd with ``supabase_admin`` (PostgreSQL refuses to demote its bootstrap superuser)
and makes databases on it. The ``auth`` functions carry ``AUTH_FUNCTION_COMMENT`` as their
comment, so a test can tell them from the project's stand-ins of ``sql/001``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import psycopg
from psycopg import sql

from ..server.cluster import TemporaryPostgres
from ..server.connection import make_dsn
from ..server.initdb_cache import InitdbCache
from ..server.process import OsUser, Startable
from .rls import ANON, AUTHENTICATED, SERVICE_ROLE

SUPABASE_ADMIN = "supabase_admin"
AUTH_ADMIN = "supabase_auth_admin"
POSTGRES = "postgres"
AUTHENTICATOR = "authenticator"
API_ROLES = (ANON, AUTHENTICATED, SERVICE_ROLE)
AUTH_SCHEMA = "auth"
AUTH_FUNCTION_COMMENT = "Supabase-like bootstrap (pytest_exai_sessions.testing.supabase)"
# The OID of the role initdb creates; PostgreSQL refuses to take SUPERUSER from it.
_BOOTSTRAP_SUPERUSER_OID = 10


@dataclass(frozen=True)
class RoleAttributes:
    """The attributes of a role as ``pg_roles`` shows them."""

    login: bool = False
    inherit: bool = True
    createdb: bool = False
    createrole: bool = False
    bypassrls: bool = False
    superuser: bool = False

    def clauses(self) -> sql.Composed:
        words = [
            "LOGIN" if self.login else "NOLOGIN",
            "INHERIT" if self.inherit else "NOINHERIT",
            "CREATEDB" if self.createdb else "NOCREATEDB",
            "CREATEROLE" if self.createrole else "NOCREATEROLE",
            "BYPASSRLS" if self.bypassrls else "NOBYPASSRLS",
            "SUPERUSER" if self.superuser else "NOSUPERUSER",
        ]
        return sql.SQL(" ").join(sql.SQL(word) for word in words)


# The roles this bootstrap creates (or brings to these attributes), and whom each is granted to.
ROLES: Mapping[str, RoleAttributes] = {
    ANON: RoleAttributes(),
    AUTHENTICATED: RoleAttributes(),
    SERVICE_ROLE: RoleAttributes(bypassrls=True),
    AUTHENTICATOR: RoleAttributes(login=True, inherit=False),
    AUTH_ADMIN: RoleAttributes(login=True, inherit=False, createrole=True),
    POSTGRES: RoleAttributes(login=True, createdb=True, createrole=True, bypassrls=True),
}
MEMBERSHIPS: Mapping[str, tuple[str, ...]] = {
    AUTHENTICATOR: API_ROLES,
    POSTGRES: API_ROLES,
}

# Read the per-claim setting first (older PostgREST), then the claims object (current
# PostgREST). current_setting(..., true) gives '' after a transaction that set it ended.
_CLAIM = "nullif(pg_catalog.current_setting({setting}, true), '')"
_CLAIMS_KEY = "(nullif(pg_catalog.current_setting('request.jwt.claims', true), '')::jsonb ->> {key})"
AUTH_FUNCTIONS: Mapping[str, tuple[str, str]] = {
    # name: (result type, body)
    "uid": (
        "uuid",
        f"SELECT CAST(coalesce({_CLAIM.format(setting=repr('request.jwt.claim.sub'))}, "
        f"{_CLAIMS_KEY.format(key=repr('sub'))}) AS uuid)",
    ),
    "role": (
        "text",
        f"SELECT coalesce({_CLAIM.format(setting=repr('request.jwt.claim.role'))}, "
        f"{_CLAIMS_KEY.format(key=repr('role'))})",
    ),
    "jwt": (
        "jsonb",
        f"SELECT CAST(coalesce({_CLAIM.format(setting=repr('request.jwt.claim'))}, "
        f"{_CLAIM.format(setting=repr('request.jwt.claims'))}) AS jsonb)",
    ),
}


def _check_superuser(conn: psycopg.Connection[Any]) -> None:
    if not isinstance(conn, psycopg.Connection):
        raise TypeError(f"conn must be a psycopg Connection, not {type(conn).__name__}")
    row = conn.execute(
        "SELECT current_user::text, rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user", prepare=False
    ).fetchone()
    if row is None or not row[1]:
        raise ValueError(
            f"the Supabase-like bootstrap needs a superuser connection, and {row[0] if row else '?'} is not one: "
            f"connect as the server's superuser (on SupabaseLikeServer, {SUPABASE_ADMIN})"
        )
    postgres = conn.execute(
        "SELECT oid::bigint FROM pg_catalog.pg_roles WHERE rolname = %s", (POSTGRES,), prepare=False
    ).fetchone()
    if postgres is not None and postgres[0] == _BOOTSTRAP_SUPERUSER_OID:
        raise ValueError(
            f"role {POSTGRES!r} is this server's bootstrap superuser, which PostgreSQL refuses to demote: "
            f"initdb the server with another superuser (as Supabase's is {SUPABASE_ADMIN}), e.g. SupabaseLikeServer"
        )


def _bootstrap_roles(conn: psycopg.Connection[Any]) -> None:
    for role, attributes in ROLES.items():
        exists = conn.execute("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", (role,), prepare=False)
        verb = "ALTER" if exists.fetchone() else "CREATE"
        conn.execute(
            sql.SQL("{} ROLE {} {}").format(sql.SQL(verb), sql.Identifier(role), attributes.clauses()), prepare=False
        )
    for member, granted in MEMBERSHIPS.items():
        for role in granted:
            conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(member)), prepare=False)


def _roles(names: tuple[str, ...]) -> sql.Composed:
    return sql.SQL(", ").join(sql.Identifier(name) for name in names)


# What the Data API's "default privileges for new entities" give the API roles in public.
_DATA_API_DEFAULT_PRIVILEGES = (
    ("TABLES", "SELECT, INSERT, UPDATE, DELETE"),
    ("SEQUENCES", "USAGE, SELECT"),
    ("FUNCTIONS", "EXECUTE"),
)


def _bootstrap_database(conn: psycopg.Connection[Any], *, data_api_default_privileges: bool) -> None:
    dbname = conn.info.dbname
    users = (*API_ROLES, POSTGRES)
    steps: list[sql.Composed] = [
        sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(dbname), sql.Identifier(SUPABASE_ADMIN)),
        sql.SQL("GRANT CREATE, CONNECT, TEMPORARY ON DATABASE {} TO {}").format(
            sql.Identifier(dbname), sql.Identifier(POSTGRES)
        ),
        sql.SQL("GRANT ALL ON SCHEMA public TO {}").format(sql.Identifier(POSTGRES)),
        sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(_roles(API_ROLES)),
    ]
    for kind, privileges in _DATA_API_DEFAULT_PRIVILEGES:
        verb = "GRANT {} ON {} TO {}" if data_api_default_privileges else "REVOKE {} ON {} FROM {}"
        steps.append(
            sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA public " + verb).format(
                sql.Identifier(POSTGRES), sql.SQL(privileges), sql.SQL(kind), _roles(API_ROLES)
            )
        )
    for step in steps:
        conn.execute(step, prepare=False)
    present = conn.execute("SELECT to_regnamespace(%s) IS NOT NULL", (AUTH_SCHEMA,), prepare=False).fetchone()
    if present is not None and present[0]:
        return  # bootstrapped before: keep its functions as they are (same OIDs)
    conn.execute(
        sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(sql.Identifier(AUTH_SCHEMA), sql.Identifier(AUTH_ADMIN)),
        prepare=False,
    )
    conn.execute(
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(AUTH_SCHEMA), _roles(users)), prepare=False
    )
    # Created by their owner, as Supabase's Auth service creates them.
    conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(AUTH_ADMIN)), prepare=False)
    for name, (result, body) in AUTH_FUNCTIONS.items():
        function = sql.Identifier(AUTH_SCHEMA, name)
        conn.execute(
            sql.SQL("CREATE FUNCTION {}() RETURNS {} LANGUAGE sql STABLE AS {}").format(
                function, sql.SQL(result), sql.Literal(body)
            ),
            prepare=False,
        )
        conn.execute(
            sql.SQL("COMMENT ON FUNCTION {}() IS {}").format(function, sql.Literal(AUTH_FUNCTION_COMMENT)),
            prepare=False,
        )
        conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {}() TO {}").format(function, _roles(users)), prepare=False)
    conn.execute("RESET ROLE", prepare=False)


def make_supabase_like(conn: psycopg.Connection[Any], *, data_api_default_privileges: bool = False) -> None:
    """Make the server and the database of ``conn`` (a superuser's) look like Supabase's.

    ``data_api_default_privileges``: what ``postgres`` creates in ``public`` is granted to
    the API roles (Supabase's opt-in "default privileges for new entities"); else not.
    Roles are cluster-wide: never run this on a server other tests share. Idempotent: a
    second run changes nothing (the ``auth`` schema and its functions are kept as they are).
    Raises ``ValueError`` (and changes nothing) when ``conn`` is no superuser's, or when
    ``postgres`` is the server's bootstrap superuser.
    """
    _check_superuser(conn)
    with conn.transaction():
        _bootstrap_roles(conn)
        _bootstrap_database(conn, data_api_default_privileges=data_api_default_privileges)


class SupabaseLikeServer(Startable):
    """A throwaway PostgreSQL whose superuser is ``supabase_admin``, made to look like Supabase.

    ``with SupabaseLikeServer(bindir) as supabase:`` starts it (its ``postgres`` database
    bootstrapped); ``supabase.dsn(dbname)`` connects as the demoted ``postgres``,
    ``supabase.admin_dsn(dbname)`` as ``supabase_admin``; ``with supabase.database() as
    dbname:`` gives a new bootstrapped database, dropped afterwards. Stopping it removes
    every file.
    """

    def __init__(
        self,
        bindir: Path,
        *,
        basedir: Path | None = None,
        os_user: OsUser | None = None,
        listen_tcp: bool = False,
        settings: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
        initdb_cache: InitdbCache | None = None,
    ) -> None:
        """``initdb_cache``: as for ``TemporaryPostgres``; the superuser is in its key, so this has its own entry."""
        self.server = TemporaryPostgres(
            bindir,
            basedir=basedir,
            os_user=os_user,
            superuser=SUPABASE_ADMIN,
            listen_tcp=listen_tcp,
            settings=settings,
            startup_timeout=startup_timeout,
            initdb_cache=initdb_cache,
        )

    def start(self) -> Self:
        self.server.start()
        try:
            with psycopg.connect(self.admin_dsn(), autocommit=True) as conn:
                make_supabase_like(conn)
        except BaseException:
            self.server.stop()
            raise
        return self

    def stop(self) -> None:
        self.server.stop()

    def dsn(self, dbname: str = "postgres", *, user: str = POSTGRES) -> str:
        """DSN of ``dbname`` as ``user`` (default: the demoted ``postgres``, as a Supabase project connects)."""
        return make_dsn(host=self.server.host, port=self.server.port, user=user, dbname=dbname)

    def admin_dsn(self, dbname: str = "postgres") -> str:
        """DSN of ``dbname`` as the superuser ``supabase_admin`` (what Supabase keeps to itself)."""
        return self.dsn(dbname, user=SUPABASE_ADMIN)

    def create_database(self, dbname: str | None = None, *, data_api_default_privileges: bool = False) -> str:
        """Create a database as Supabase's (owner ``supabase_admin``, schema ``auth``, grants); return its name."""
        name = dbname or f"supabase_{secrets.token_hex(4)}"
        with psycopg.connect(self.admin_dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)), prepare=False)
        try:
            with psycopg.connect(self.admin_dsn(name), autocommit=True) as conn:
                make_supabase_like(conn, data_api_default_privileges=data_api_default_privileges)
        except BaseException:
            self.drop_database(name)
            raise
        return name

    def drop_database(self, dbname: str) -> None:
        with psycopg.connect(self.admin_dsn(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)), prepare=False
            )

    @contextmanager
    def database(self, *, data_api_default_privileges: bool = False) -> Iterator[str]:
        """A new bootstrapped database for the block, dropped after it (also when it raises)."""
        name = self.create_database(data_api_default_privileges=data_api_default_privileges)
        try:
            yield name
        finally:
            self.drop_database(name)

    def __repr__(self) -> str:
        return f"<SupabaseLikeServer {self.server!r}>"
