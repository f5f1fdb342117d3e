"""Act as a Supabase API role on a connection, as PostgREST does for each request.

``as_user(conn, user_id)``, ``as_role(conn, "anon")`` and ``as_service_role(conn)`` return
a context manager (``with`` for a ``psycopg.Connection``, ``async with`` for a
``psycopg.AsyncConnection``) that, inside a transaction, runs ``SET LOCAL ROLE`` and puts
the JWT claims into ``request.jwt.claims`` with ``set_config(..., true)``, so that the
row-level security policies and ``auth.uid()`` / ``auth.role()`` / ``auth.jwt()`` see that
identity. On exit everything is as before, also when the block raised:

- on a connection outside a transaction, the block is a transaction of its own: committed
  when the block succeeds, rolled back when it raises, and ``SET LOCAL`` ends with it;
- inside a transaction, the block is a savepoint: rolled back to when the block raises,
  and on success the previous role and claims are set back before it is released
  (a released savepoint would otherwise keep them until the outer transaction ends).

The connecting user must be allowed to switch to the role: a superuser (the plugin's
temporary server connects as one), or a member of it, as Supabase's ``authenticator`` is.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from ..models import check_json_object

ANON = "anon"
AUTHENTICATED = "authenticated"
SERVICE_ROLE = "service_role"

CLAIMS_SETTING = "request.jwt.claims"
# Older PostgREST versions set one setting per claim, and Supabase's auth.uid(),
# auth.role() and auth.jwt() still prefer these when they are non-empty. They are blanked
# inside the block so that the claims given here are the only ones in force.
_LEGACY_CLAIM_SETTINGS = ("request.jwt.claim.sub", "request.jwt.claim.role", "request.jwt.claim")
_SETTINGS = (CLAIMS_SETTING, *_LEGACY_CLAIM_SETTINGS)
# PostgreSQL truncates longer identifiers, which could silently name another role.
_MAX_ROLE_BYTES = 63

Connection = psycopg.Connection[Any]
Statement = tuple[sql.SQL | sql.Composed, tuple[Any, ...]]
AsyncConnection = psycopg.AsyncConnection[Any]


@dataclass(frozen=True)
class Identity:
    """Who the block acts as: a database role and the JWT claims of the request."""

    role: str
    claims: Mapping[str, Any] = field(default_factory=dict)

    @property
    def user_id(self) -> str | None:
        sub = self.claims.get("sub")
        return sub if isinstance(sub, str) else None


def _check_role(role: object) -> str:
    if not isinstance(role, str):
        raise TypeError(f"role must be a str, not {type(role).__name__}")
    if not role or "\x00" in role:
        raise ValueError(f"role must be a non-empty name without NUL, got {role!r}")
    if len(role.encode()) > _MAX_ROLE_BYTES:
        raise ValueError(f"role name {role!r} is longer than {_MAX_ROLE_BYTES} bytes; PostgreSQL would truncate it")
    return role


def _check_user_id(user_id: object) -> str:
    if isinstance(user_id, uuid.UUID):
        return str(user_id)
    if isinstance(user_id, str):
        try:
            return str(uuid.UUID(user_id))
        except ValueError:
            pass
    raise ValueError(
        f"user_id must be a UUID (auth.uid() returns uuid, as Supabase's does), got {user_id!r}; "
        "for a readable fixed id use e.g. uuid.uuid5(uuid.NAMESPACE_URL, 'alice')"
    )


def _identity(role: object, claims: Mapping[str, Any] | None, *, sub: str | None = None) -> Identity:
    """Validate everything before anything is sent: bad input raises and changes nothing."""
    name = _check_role(role)
    if claims is not None and not isinstance(claims, Mapping):
        raise TypeError(f"claims must be a mapping, not {type(claims).__name__}")
    given = check_json_object(dict(claims or {}))
    fixed: dict[str, Any] = {"role": name} if sub is None else {"role": name, "sub": sub}
    for key, value in given.items():
        if key in fixed and value != fixed[key]:
            raise ValueError(f"claims[{key!r}] is {value!r} but the block acts with {key} {fixed[key]!r}")
    merged = {**given, **fixed}
    if "sub" in given and sub is None:
        # auth.uid() casts the subject to uuid: a bad one would fail in the first policy check.
        merged["sub"] = _check_user_id(given["sub"])
    return Identity(name, merged)


def _switch(identity: Identity) -> list[Statement]:
    claims = json.dumps(dict(identity.claims), allow_nan=False, separators=(",", ":"))
    blanks = sql.SQL(", ").join(sql.SQL("set_config(%s, '', true)") for _ in _LEGACY_CLAIM_SETTINGS)
    return [
        (sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(identity.role)), ()),
        (
            sql.SQL("SELECT set_config(%s, %s, true), {}").format(blanks),
            (CLAIMS_SETTING, claims, *_LEGACY_CLAIM_SETTINGS),
        ),
    ]


# The role in force and the claim settings, read before switching when the block is nested.
_READ_PREVIOUS = sql.SQL("SELECT current_setting('role'), {}").format(
    sql.SQL(", ").join(sql.SQL("coalesce(current_setting(%s, true), '')") for _ in _SETTINGS)
)


def _restore(previous: tuple[Any, ...]) -> list[Statement]:
    role, *values = previous
    # current_setting('role') is 'none' when no SET ROLE is in force.
    set_role: sql.SQL | sql.Composed = (
        sql.SQL("SET LOCAL ROLE NONE") if role == "none" else sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role))
    )
    configs = sql.SQL(", ").join(sql.SQL("set_config(%s, %s, true)") for _ in _SETTINGS)
    params: list[Any] = []
    for name, value in zip(_SETTINGS, values, strict=True):
        params += [name, value]
    return [(set_role, ()), (sql.SQL("SELECT {}").format(configs), tuple(params))]


# Every statement here with prepare=False: psycopg would prepare one on its 6th run on a
# connection, and behind a pooler in transaction mode the next block may run on a server
# connection that lacks it (or has another client's statement of that name).


@contextmanager
def _acting(conn: Connection, identity: Identity) -> Iterator[Connection]:
    nested = conn.info.transaction_status != TransactionStatus.IDLE
    with conn.transaction():
        previous = conn.execute(_READ_PREVIOUS, _SETTINGS, prepare=False).fetchone() if nested else None
        for query, params in _switch(identity):
            conn.execute(query, params, prepare=False)
        yield conn
        if previous is not None:
            for query, params in _restore(previous):
                conn.execute(query, params, prepare=False)


@asynccontextmanager
async def _acting_async(conn: AsyncConnection, identity: Identity) -> AsyncIterator[AsyncConnection]:
    nested = conn.info.transaction_status != TransactionStatus.IDLE
    async with conn.transaction():
        previous = None
        if nested:
            previous = await (await conn.execute(_READ_PREVIOUS, _SETTINGS, prepare=False)).fetchone()
        for query, params in _switch(identity):
            await conn.execute(query, params, prepare=False)
        yield conn
        if previous is not None:
            for query, params in _restore(previous):
                await conn.execute(query, params, prepare=False)


class ActingAs:
    """The context manager ``as_user``/``as_role``/``as_service_role`` return.

    ``with`` on a ``psycopg.Connection``, ``async with`` on a ``psycopg.AsyncConnection``;
    it yields the connection.
    """

    def __init__(self, conn: Connection | AsyncConnection, identity: Identity) -> None:
        if not isinstance(conn, psycopg.Connection | psycopg.AsyncConnection):
            raise TypeError(f"conn must be a psycopg Connection or AsyncConnection, not {type(conn).__name__}")
        self.conn = conn
        self.identity = identity
        self._sync: AbstractContextManager[Connection] | None = None
        self._async: AbstractAsyncContextManager[AsyncConnection] | None = None

    def __enter__(self) -> Connection:
        if not isinstance(self.conn, psycopg.Connection):
            raise TypeError("this is an AsyncConnection: use 'async with', not 'with'")
        if self._sync is not None or self._async is not None:
            raise RuntimeError("an ActingAs block can be entered only once; call as_user()/as_role() again")
        self._sync = _acting(self.conn, self.identity)
        return self._sync.__enter__()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._sync is not None
        return self._sync.__exit__(exc_type, exc, tb)

    async def __aenter__(self) -> AsyncConnection:
        if not isinstance(self.conn, psycopg.AsyncConnection):
            raise TypeError("this is a synchronous Connection: use 'with', not 'async with'")
        if self._sync is not None or self._async is not None:
            raise RuntimeError("an ActingAs block can be entered only once; call as_user()/as_role() again")
        self._async = _acting_async(self.conn, self.identity)
        return await self._async.__aenter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        assert self._async is not None
        return await self._async.__aexit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        return f"<ActingAs role={self.identity.role!r} claims={dict(self.identity.claims)!r}>"


def as_role(conn: Connection | AsyncConnection, role: str, *, claims: Mapping[str, Any] | None = None) -> ActingAs:
    """Act as database role ``role`` (e.g. ``"anon"``) with JWT claims ``{"role": role, **claims}``."""
    return ActingAs(conn, _identity(role, claims))


def as_user(
    conn: Connection | AsyncConnection,
    user_id: uuid.UUID | str,
    *,
    claims: Mapping[str, Any] | None = None,
    role: str = AUTHENTICATED,
) -> ActingAs:
    """Act as the signed-in user ``user_id`` (a UUID): role ``authenticated``, claims ``sub`` and ``role``."""
    return ActingAs(conn, _identity(role, claims, sub=_check_user_id(user_id)))


def as_service_role(conn: Connection | AsyncConnection, *, claims: Mapping[str, Any] | None = None) -> ActingAs:
    """Act as ``service_role`` (bypasses row-level security, as Supabase's service key does)."""
    return ActingAs(conn, _identity(SERVICE_ROLE, claims))
